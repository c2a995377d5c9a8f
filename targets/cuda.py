"""CUDA artifacts carry compiled device code: the source TVM generates, compiled by nvcc.

TVM 0.27 keeps a CUDA module's generated source in the exported library (format ``cuda``)
and compiles it when the library is loaded, through a ``tvm_callback_cuda_compile`` that
only a full TVM installation registers: a runtime-only deployment fails there. Here the
library's packed imports (TVM's ``export_library(fpack_imports=...)`` hook) are rewritten
before linking: each CUDA module's source is compiled by ``nvcc`` into a fatbin holding SASS
for the target's arch and PTX for newer GPUs, and stored with format ``fatbin``, which the
CUDA runtime loads directly (``cuModuleLoadData``).

Packed-imports layout (tvm-ffi ``ProcessLibraryBin``): ``<nbytes u64> <indptr vec<u64>>
<child_indices vec<u64>>`` then per module ``<kind str> [<bytes str>]``; a CUDA module's
bytes are ``<fmt str> <function map> <data str> <rest>``, the function map being ``<count
u64>`` entries of ``<key str> <name str> <arg types vec<4 bytes>> <launch tags vec<str>>
<extra tags vec<4 bytes>>``. Strings and vectors are u64-length-prefixed, little endian.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile

from .backend import Backend, register
from .parse import TargetError

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def blob(self) -> bytes:
        n = self.u64()
        out = self.data[self.pos:self.pos + n]
        if len(out) != n:
            raise ValueError("truncated packed module")
        self.pos += n
        return out

    def skip_vec(self, item: int) -> None:
        n = self.u64()
        self.pos += n * item


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def nvcc_path() -> str:
    path = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.isfile(p)), None)
    if path is None:
        raise TargetError("building for CUDA needs nvcc (the CUDA toolkit) on PATH")
    return path


def compile_fatbin(source: str, arch: str) -> bytes:
    """``source`` compiled by nvcc for ``arch`` (e.g. "sm_90"): SASS plus PTX."""
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory(prefix="dlrmc-nvcc-") as tmp:
        src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.fatbin")
        with open(src, "w") as f:
            f.write(source)
        cmd = [nvcc_path(), "-fatbin", "-O3", "-std=c++17",
               f"-gencode=arch={compute},code={arch}", f"-gencode=arch={compute},code={compute}",
               "-o", out, src]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise TargetError(f"nvcc failed for {arch}:\n{res.stderr[-2000:]}")
        with open(out, "rb") as f:
            return f.read()


def _compile_cuda_module(raw: bytes, arch: str) -> bytes:
    r = _Reader(raw)
    fmt = r.blob()
    start = r.pos
    for _ in range(r.u64()):
        r.blob()                     # key
        r.blob()                     # name
        r.skip_vec(4)                # argument types
        for _ in range(r.u64()):     # launch parameter tags
            r.blob()
        r.skip_vec(4)                # extra tags
    fmap = raw[start:r.pos]
    data = r.blob()
    rest = raw[r.pos:]
    if fmt != b"cuda":
        return raw                   # already binary
    return _str(b"fatbin") + fmap + _str(compile_fatbin(data.decode(), arch)) + rest


def compile_device_code(blob: bytes, arch: str) -> bytes:
    """The packed imports with every CUDA source module compiled to a fatbin."""
    (nbytes,) = struct.unpack_from("<Q", blob, 0)
    r = _Reader(blob[:8 + nbytes], 8)
    indptr_at = r.pos
    count = r.u64()
    r.pos += 8 * count
    r.skip_vec(8)
    out = [blob[indptr_at:r.pos]]
    for _ in range(count - 1):
        kind = r.blob()
        out.append(_str(kind))
        if kind != b"_lib":
            raw = r.blob()
            out.append(_str(_compile_cuda_module(raw, arch) if kind == b"cuda" else raw))
    out.append(blob[r.pos:8 + nbytes])
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


_ARRAY = re.compile(r"(const unsigned char __tvm_ffi__library_bin\[)(\d+)(\] = \{)(.*?)(\};)",
                    re.S)


def pack_imports(arch: str):
    """An ``export_library`` ``fpack_imports`` that embeds compiled device code."""
    from tvm.runtime import _ffi_api

    def fpack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        text = _ffi_api.ModulePackImportsToC(module, is_system_lib, prefix)
        m = _ARRAY.search(text)
        if m is None:
            raise TargetError("unexpected layout of TVM's packed imports; cannot embed device "
                              "code")
        blob = bytes(int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]{2}", m.group(4)))
        new = compile_device_code(blob, arch)
        rows = ",\n  ".join(",".join(f"0x{b:02x}" for b in new[i:i + 20])
                            for i in range(0, len(new), 20))
        text = text[:m.start()] + f"{m.group(1)}{len(new)}{m.group(3)}\n  {rows},\n{m.group(5)}" \
            + text[m.end():]
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(path, "w") as f:
            f.write(text)
        return path

    return fpack


def fatbin_archs(library: bytes) -> list[str]:
    """The SASS arches of the fatbins embedded in a built library (for tests and checks):
    the ``sm_NN`` names found in the fatbins' embedded ELF notes."""
    archs = set()
    at = library.find(FATBIN_MAGIC)
    while at >= 0:
        archs |= {a.decode() for a in re.findall(rb"sm_\d+a?", library[at:at + (1 << 22)])}
        at = library.find(FATBIN_MAGIC, at + 4)
    return sorted(archs)


class CudaBackend(Backend):
    """CUDA targets: our GPU embedding-bag and interaction kernels, dense layers as Relax ops
    for dlight's GPU rules, Relax's CUDA-graph rewriting, device code compiled here by nvcc
    (``pack_imports``); the runtime needs a driver and a GPU."""

    name = "cuda"
    device = "cuda"
    lowering = "gpu"
    refuses = {
        "emb_quant": "--emb-quant is not available for CUDA targets yet",
        "precision": "--precision bf16/fp16 is not available for CUDA targets yet",
        "mlp_quant": "--mlp-quant is not available for CUDA targets yet",
        "tuning_log": "tuning logs for CUDA targets are not supported yet (dlight's GPU rules "
                      "schedule the dense layers)",
    }

    def matches(self, target) -> bool:
        return target.kind.name == "cuda"

    def check_tools(self, target) -> None:
        nvcc_path()

    def requirements(self, target) -> dict:
        return {**super().requirements(target), "cuda_arch": str(target.attrs["arch"])}

    def build(self, mod, target, tuning_log, expect, log):
        import tvm
        from tvm import relax

        self.check_options(tuning_log=tuning_log)
        mod = relax.transform.LiftTransformParams(shared_transform=True)(mod)
        with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
            return tvm.compile(mod, target), {"tuned": {}, "default": []}

    def export_library(self, module, target, path, workspace=None) -> None:
        module.export_library(path, fpack_imports=pack_imports(str(target.attrs["arch"])),
                              workspace_dir=workspace)


register(CudaBackend())
