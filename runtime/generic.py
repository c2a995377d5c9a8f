"""Running an artifact compiled through the generic ONNX path (``dlrmc.compiler.generic``).

Its inputs are the ONNX graph's own, listed in the manifest; ``run`` checks each array's
count, dtype, rank and static sizes against them before any native code runs.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from ..artifact import ArtifactError, Manifest, read_manifest, read_weights
from .devices import artifact_device, is_host
from .model import load_library, set_threads, to_tvm, vm_function
from .validate import InputError


class GenericModel:
    """``run(*arrays)`` -> the graph's outputs as numpy arrays, in the manifest's order."""

    def __init__(self, artifact_dir: str, verify: bool = True, threads: int | None = None,
                 manifest: Manifest | None = None):
        self.path = os.fspath(artifact_dir)
        self.threads = set_threads(threads)
        self.manifest = manifest or read_manifest(self.path, verify=verify)   # (load read it)
        self.inputs = self.manifest.inputs
        self.device = artifact_device(self.path, self.manifest)
        if not is_host(self.device):
            raise ArtifactError("generic ONNX artifacts run on the CPU only")
        vm = VirtualMachine(load_library(self.path), self.device)
        self._main = vm_function(vm, self.manifest.entry, "entry")
        self._lock = threading.Lock()
        self._weights = [tvm.runtime.tensor(w, self.device)
                         for w in read_weights(self.path, self.manifest)]

    def _check(self, arrays) -> list[np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} inputs "
                             f"({', '.join(i['name'] for i in self.inputs)}), got {len(arrays)}")
        out = []
        for spec, a in zip(self.inputs, arrays):
            a = np.asarray(a)
            if str(a.dtype) != spec["dtype"]:
                raise InputError(f"input {spec['name']!r} must be {spec['dtype']}, got {a.dtype}")
            if a.ndim != len(spec["shape"]) or any(
                    isinstance(d, int) and d > 0 and d != n for d, n in zip(spec["shape"], a.shape)):
                raise InputError(f"input {spec['name']!r} must have shape {spec['shape']}, got "
                                 f"{list(a.shape)}")
            out.append(np.ascontiguousarray(a))
        return out

    def run(self, *arrays) -> list[np.ndarray]:
        args = to_tvm(self._check(arrays))
        with self._lock:       # one VM: one call at a time
            result = self._main(*args, *self._weights)
        items = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return [r.numpy() for r in items]
