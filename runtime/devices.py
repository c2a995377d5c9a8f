"""What an artifact needs of this machine, checked before its code runs, and the TVM device it
runs on. The manifest's ``target.requires`` says it (the backend that built the code wrote
it: ``dlrmc.targets.backend``): ``device``, a TVM device name, and for host code the
``machine`` and ``cpu_flags``. Nothing here knows a device by name beyond TVM's own naming:
a device other than the host needs TVM's sidecar runtime for it (``libtvm_runtime_{name}``,
loaded here, with the toolkit libraries it links looked for beyond the loader's path) and a
device of that kind present.
"""

from __future__ import annotations

import os

import tvm

from ..artifact import ArtifactError, Manifest


def check_cpu(requires: dict, cpuinfo: str = "/proc/cpuinfo") -> None:
    """Refuse an artifact this CPU cannot run (it would die of SIGILL, not raise)."""
    import platform

    machine = requires.get("machine")
    aliases = {"x86_64": {"x86_64", "amd64"}, "aarch64": {"aarch64", "arm64"}}
    if machine and platform.machine().lower() not in aliases.get(machine, {machine}):
        raise ArtifactError(f"the artifact was built for {machine}; this machine is "
                            f"{platform.machine()}")
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return  # not Linux: nothing to check against
    # x86 lists "flags", Arm "Features"; under an emulator (qemu-user) the file is the host's
    # and has the other key, and nothing can be checked.
    key = "Features" if machine == "aarch64" else "flags"
    flags = set()
    for line in text.splitlines():
        if line.startswith(key):
            flags |= set(line.split(":", 1)[1].split())
    missing = [f for f in requires.get("cpu_flags", []) if f not in flags]
    if flags and missing:
        raise ArtifactError(f"code for this target needs CPU features this CPU lacks: "
                            f"{', '.join(missing)} (compile with a --target for this CPU, e.g. "
                            "the default host, to run here)")


TOOLKIT_LIBRARY_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib")   # under a toolkit root


def toolkit_candidates(soname: str, env=os.environ) -> list[str]:
    """Where a device toolkit's runtime library (``libcudart.so.13``) not on the loader's path
    may lie: the toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda) or the NVIDIA pip wheels
    beside this Python's packages (nvidia/cu13/lib, nvidia/cuda_runtime/lib)."""
    import glob
    import sysconfig

    roots = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = [os.path.join(r, d) for r in roots if r for d in TOOLKIT_LIBRARY_DIRS]
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    return [os.path.join(d, soname) for d in dirs if os.path.isfile(os.path.join(d, soname))]


def _load_device_runtime(name: str) -> str | None:
    """Load TVM's runtime for device ``name`` (its device API and module loader), a sidecar
    library that TVM loads by itself only in a full (compiler) installation; the reason when
    it cannot. A toolkit library it links is looked for beyond the loader's path too
    (``toolkit_candidates``)."""
    if tvm.get_global_func(f"device_api.{name}", allow_missing=True) is not None:
        return None
    import ctypes
    import re
    from pathlib import Path

    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    library = f"tvm_runtime_{name}"

    def load():
        _LOADED_LIBS[library] = load_lib_ctypes(
            package="tvm", target_name=library, mode="RTLD_LOCAL",
            extra_lib_paths=[Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent])

    try:
        load()
    except (OSError, FileNotFoundError, RuntimeError) as e:
        missing = re.search(r"(lib[\w+-]+\.so[.\d]*)", str(e))
        found = toolkit_candidates(missing.group(1)) if missing else []
        if not found:
            hint = (f" (install {missing.group(1)}, or set CUDA_HOME to the toolkit that has "
                    "it)") if missing else ""
            return f"TVM's {name} runtime (lib{library}.so) does not load: {e}{hint}"
        try:
            ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
            load()
        except OSError as e2:
            return f"TVM's {name} runtime (lib{library}.so) does not load: {e2}"
    return None


def is_host(device) -> bool:
    return device.dlpack_device_type() == tvm.cpu().dlpack_device_type()


def device_unavailable(name: str) -> str | None:
    """Why code for TVM device ``name`` cannot run here (no runtime, driver or device), or
    None."""
    try:
        device = tvm.device(name, 0)
    except ValueError:
        return f"TVM knows no device {name!r}"
    if is_host(device):
        return None
    return _load_device_runtime(name) or (None if device.exist else f"no {name} device found")


def device_for(requires: dict, what: str):
    """The TVM device code with these ``requires`` runs on, once this machine is checked to
    run it (``what`` names the code in the error)."""
    name = requires.get("device")
    reason = device_unavailable(name) if isinstance(name, str) else "no device named"
    if reason:
        needs = ", ".join(f"{k} {v}" for k, v in requires.items()
                          if k not in ("device", "device_type"))
        raise ArtifactError(f"{what} was built for {name}{f' ({needs})' if needs else ''} and "
                            f"cannot run here: {reason}")
    check_cpu(requires)
    return tvm.device(name, 0)


def artifact_device(path: str, manifest: Manifest):
    """The device an artifact runs on (``device_for`` its manifest's requirements)."""
    return device_for(manifest.target["requires"], path)
