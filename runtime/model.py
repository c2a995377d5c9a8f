"""Loading an artifact and running batches on it with the TVM runtime (no torch, no compiler)."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from ..artifact import LIBRARY, ArtifactError, read_manifest, read_weights
from ..frontend.arch import Arch
from .plan import pick, slice_batch
from .validate import check_batch, check_jagged, check_kjt


def to_tvm(arrays: list[np.ndarray]) -> list[tvm.runtime.Tensor]:
    """Hand arrays to TVM in one copy: into a single buffer with each array on a 64-byte
    boundary, which TVM then takes zero-copy through DLPack. (tvm.runtime.tensor's Python
    path costs more than the model itself at batch 1.)"""
    sizes = [-(-a.nbytes // 64) * 64 or 64 for a in arrays]
    buf = np.empty(sum(sizes) + 64, np.uint8)
    pos = -buf.ctypes.data % 64
    out = []
    for a, n in zip(arrays, sizes):
        if a.size == 0:  # numpy gives empty views no usable address
            out.append(tvm.runtime.empty(a.shape, str(a.dtype)))
            continue
        view = buf[pos:pos + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        out.append(tvm.runtime.from_dlpack(view))
        pos += n
    return out


def time_calls(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


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


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` worker threads for TVM's parallel loops (default: TVM_NUM_THREADS, else
    every CPU this process may run on). TVM's own default ignores half the cores on x86,
    assuming they are hyper-threads."""
    if threads is None:
        env = os.environ.get("TVM_NUM_THREADS")
        threads = int(env) if env else len(os.sched_getaffinity(0))
    cpus = sorted(os.sched_getaffinity(0))
    tvm.get_global_func("runtime.config_threadpool")(-3, int(threads), [str(c) for c in cpus])
    return tvm.runtime.num_threads()


CUDA_LIBRARY_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib")   # under a CUDA root


def cudart_candidates(soname: str, env=os.environ) -> list[str]:
    """Where a CUDA runtime library (``libcudart.so.13``) not on the loader's path may lie: the
    CUDA toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda) or the NVIDIA pip wheels beside
    this Python's packages (nvidia/cu13/lib, nvidia/cuda_runtime/lib)."""
    import glob
    import sysconfig

    roots = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = [os.path.join(r, d) for r in roots if r for d in CUDA_LIBRARY_DIRS]
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    return [os.path.join(d, soname) for d in dirs if os.path.isfile(os.path.join(d, soname))]


def _load_cuda_runtime() -> str | None:
    """Load TVM's CUDA runtime (its device API and module loader), a sidecar library that TVM
    loads by itself only in a full (compiler) installation; the reason when it cannot. The
    CUDA runtime library it links is looked for beyond the loader's path too
    (``cudart_candidates``)."""
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return None
    import ctypes
    import re
    from pathlib import Path

    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    def load():
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", mode="RTLD_LOCAL",
            extra_lib_paths=[Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent])

    try:
        load()
    except (OSError, FileNotFoundError, RuntimeError) as e:
        missing = re.search(r"(libcudart\.so[.\d]*)", str(e))
        found = cudart_candidates(missing.group(1)) if missing else []
        if not found:
            hint = (f" (install the CUDA runtime, {missing.group(1)}, or set CUDA_HOME to the "
                    "CUDA toolkit)") if missing else ""
            return f"TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load: {e}{hint}"
        try:
            ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
            load()
        except OSError as e2:
            return f"TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load: {e2}"
    return None


def cuda_unavailable() -> str | None:
    """Why no CUDA artifact can run here (no CUDA runtime, driver or GPU), or None."""
    return _load_cuda_runtime() or (None if tvm.cuda(0).exist else "no CUDA GPU found")


# What must hold on this machine before code for a device runs, by the device name the
# manifest's ``target.requires.device`` gives (the backend that built it wrote it there):
# (requires, what) -> None, or an ArtifactError naming what is missing.
def _cpu_ready(requires: dict, what: str) -> None:
    check_cpu(requires)


def _cuda_ready(requires: dict, what: str) -> None:
    reason = cuda_unavailable()
    if reason:
        raise ArtifactError(f"{what} was built for CUDA ({requires.get('cuda_arch', '?')}) and "
                            f"cannot run here: {reason}")


DEVICES = {"cpu": (_cpu_ready, tvm.cpu), "cuda": (_cuda_ready, tvm.cuda)}


def device_for(requires: dict, what: str):
    """The TVM device code with these ``requires`` runs on, once this machine is checked to
    run it (``what`` names the code in the error)."""
    name = requires.get("device")
    if name not in DEVICES:
        raise ArtifactError(f"{what} was built for device {name!r}; this runtime runs "
                            f"{', '.join(DEVICES)}")
    ready, device = DEVICES[name]
    ready(requires, what)
    return device(0)


def artifact_device(path: str, manifest: dict):
    """The device an artifact runs on (``device_for`` its manifest's requirements)."""
    return device_for(manifest["target"]["requires"], path)


def load_library(path: str) -> tvm.runtime.Module:
    """The artifact's compiled library (checked by ``read_manifest`` first: a truncated file
    must never reach the loader, which would die of SIGBUS)."""
    try:
        return tvm.runtime.load_module(os.path.join(path, LIBRARY))
    except Exception as e:  # noqa: BLE001 - dlopen failures surface as many types
        raise ArtifactError(f"cannot load {os.path.join(path, LIBRARY)}: {e}") from None


def vm_function(vm: VirtualMachine, name, field: str):
    """The VM function a manifest field names; an ``ArtifactError`` naming the field if the
    library has none of that name."""
    try:
        return vm[name]
    except (AttributeError, ValueError, TypeError):
        raise ArtifactError(f"manifest.json: {field} {json.dumps(name)} is not a function of "
                            f"{LIBRARY}") from None


def check_weights(manifest: dict) -> None:
    """The weight index against the manifest's architecture: exactly the model's weights,
    each of its dtype (float32; a table may be uint8, row-wise quantised), every table with
    the rows the architecture (and so input validation) assumes, every float32 weight of its
    shape. (A manifest whose ``arch`` says a table is larger than it
    is would let out-of-range indices through to the gathers.)"""
    try:
        arch = Arch.from_dict(manifest["arch"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"manifest.json: arch is not a valid DLRM architecture: {e}") from None
    want = arch.weight_shapes()
    have = {t["name"]: t for t in manifest["weights"]["tensors"]}
    odd = [n + (" missing" if n in want else " unexpected") for n in sorted(set(want) ^ set(have))]
    if odd:
        raise ArtifactError(f"manifest.json: the weights do not match arch: {', '.join(odd[:6])}")
    for name, shape in want.items():
        got = have[name]
        table = name.startswith("emb_l.")
        dtypes = ("float32", "uint8") if table else ("float32",)   # uint8: quantised rows
        if got["dtype"] not in dtypes or (table and got["shape"][:1] != [shape[0]]) or (
                got["dtype"] == "float32" and tuple(got["shape"]) != shape):
            raise ArtifactError(f"manifest.json: weight {name} is {got['dtype']} {got['shape']}; "
                                f"arch says {' or '.join(dtypes)} {list(shape)}")


class CompiledDLRM:
    """A loaded artifact. ``predict(dense_x, lS_o, lS_i)`` -> click probabilities [B, 1].

    ``predict`` may be called from many threads at once: each thread runs its own Relax VM
    over the one library and the one copy of the weights (a VM keeps per-call state, its
    registers and frames, so one VM cannot serve two calls at a time).
    """

    def __init__(self, artifact_dir: str, verify: bool = True, mmap: bool = False,
                 threads: int | None = None):
        self.path = os.fspath(artifact_dir)
        self.threads = set_threads(threads)
        self.manifest = read_manifest(self.path, verify=verify)
        self.arch = self.manifest["arch"]
        if self.arch is None:
            raise ArtifactError(f"{self.path} is a generic (non-DLRM) artifact: load it with "
                                "dlrmc.runtime.load, which gives a GenericModel")
        check_weights(self.manifest)
        self.device = artifact_device(self.path, self.manifest)
        self._library = load_library(self.path)
        self._bucket_sizes = [int(b) for b in self.manifest["buckets"]]
        self._local = threading.local()
        vm = self._vm()
        # mmap: TVM reads the file's pages in place (fast load, memory shared between
        # processes, first touches fault pages in); else the weights are copied in at load.
        on_cpu = self.device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        weights = [tvm.runtime.from_dlpack(w) if mmap and on_cpu
                   else tvm.runtime.tensor(w, self.device)
                   for w in read_weights(self.path, self.manifest)]
        self._weights = list(vm_function(vm, self.manifest["transform_params"],
                                         "transform_params")(weights))

    def _vm(self) -> VirtualMachine:
        """This thread's VM; its entries are cached beside it."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            set_threads(self.threads)      # TVM's worker pool is per calling thread
            vm = VirtualMachine(self._library, self.device)
            self._local.main = vm_function(vm, self.manifest["entry"], "entry")
            self._local.buckets = {int(b): vm_function(vm, name, f"buckets.{b}")
                                   for b, name in self.manifest["buckets"].items()}
            self._local.vm = vm
        return vm

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        """Inputs for the entries: one host copy on the CPU; copies to the GPU otherwise."""
        if self.device.dlpack_device_type() == tvm.cpu().dlpack_device_type():
            return to_tvm(arrays)
        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]

    def _entry(self, size: int):
        """This thread's entry for a static batch ``size``, or ``main`` for 0."""
        self._vm()
        return self._local.buckets[size] if size else self._local.main

    @property
    def num_tables(self) -> int:
        return len(self.arch["embedding_sizes"])

    @property
    def buckets(self) -> list[int]:
        return sorted(self._bucket_sizes)

    def bind(self, dense_x, lS_o, lS_i) -> Callable[[], object]:
        """Validate a batch once and plan it over the entries (``dlrmc.runtime.plan``);
        return a call that runs it (what benchmarks time), giving a [B, 1] tensor or array."""
        return self._bind(*check_batch(self.arch, dense_x, lS_o, lS_i))

    def _bind(self, dense, offsets, indices) -> Callable[[], object]:
        """``bind`` for a batch already validated (the reference layout)."""
        batch = dense.shape[0]
        plan = pick(batch, self._bucket_sizes)
        if len(plan) == 1 and plan[0][1] in (0, batch):
            size = plan[0][1]
            args = self._to_device([dense, offsets, *indices])
            return lambda: self._entry(size)(*args, *self._weights)
        calls, start = [], 0
        for rows, size in plan:
            piece = slice_batch(dense, offsets, indices, start, rows, size or rows)
            calls.append((size, rows, self._to_device([piece[0], piece[1], *piece[2]])))
            start += rows

        def run():
            outs = [self._entry(size)(*args, *self._weights).numpy()[:rows]
                    for size, rows, args in calls]
            return outs[0] if len(outs) == 1 else np.concatenate(outs)

        return run

    def predict(self, dense_x, lS_o, lS_i) -> np.ndarray:
        """Validate the batch (reference layout: ``lS_o`` [T, B] bag starts, ``lS_i`` T index
        arrays) and run it; returns float32 [B, 1]."""
        return self._run(self.bind(dense_x, lS_o, lS_i))

    def predict_jagged(self, dense_x, indices, offsets) -> np.ndarray:
        """``predict`` for FBGEMM's table-batched layout: ``indices`` [N] (every table's,
        table-major), ``offsets`` [T*B+1] (``dlrmc.runtime.validate.check_jagged``)."""
        return self._run(self._bind(*check_jagged(self.arch, dense_x, indices, offsets)))

    def predict_kjt(self, dense_x, values, lengths) -> np.ndarray:
        """``predict`` for TorchRec's KeyedJaggedTensor layout: ``values`` [N] key-major,
        ``lengths`` [T*B] bag sizes (``dlrmc.runtime.validate.check_kjt``)."""
        return self._run(self._bind(*check_kjt(self.arch, dense_x, values, lengths)))

    @staticmethod
    def _run(call) -> np.ndarray:
        out = call()
        return out.numpy() if isinstance(out, tvm.runtime.Tensor) else out

    def time_per_batch(self, dense_x, lS_o, lS_i, repeat: int = 20) -> list[float]:
        """Seconds of each of ``repeat`` runs after a warm-up, validation excluded."""
        return time_calls(self.bind(dense_x, lS_o, lS_i), warmup=1, repeat=repeat)


def load(artifact_dir: str, verify: bool = True, mmap: bool = False,
         threads: int | None = None):
    """Load an artifact directory; ``verify`` checks every file's sha256 first, ``mmap`` maps
    the weights from the file instead of copying them, ``threads`` sets TVM's worker threads
    (see ``set_threads``). A DLRM gives a ``CompiledDLRM``; a graph compiled through the
    generic ONNX path (``dlrmc.compiler.generic``) a ``GenericModel``."""
    if read_manifest(artifact_dir, verify=False).get("arch", {}) is None:
        from .generic import GenericModel
        return GenericModel(artifact_dir, verify=verify, threads=threads)
    return CompiledDLRM(artifact_dir, verify=verify, mmap=mmap, threads=threads)
