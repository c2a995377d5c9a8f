"""Target parsing and one backend per target family (``backend.py``): what differs per target."""
from .backend import Backend, backend_for, register, unregister
from .cpu import CpuBackend
from .cuda import CudaBackend
from .parse import TargetError, host_target_string, parse_target, resolved, target_text


def requirements(target) -> dict:
    """What a machine needs to run code for ``target`` (its backend's answer)."""
    return backend_for(target).requirements(target)


__all__ = ["Backend", "CpuBackend", "CudaBackend", "TargetError", "backend_for",
           "host_target_string", "parse_target", "register", "requirements", "resolved",
           "target_text", "unregister"]
