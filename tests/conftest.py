"""Shared helpers: build a model, compile it once per session, and run batches through both."""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest
import torch

from dlrmc.artifact import Manifest
from dlrmc.compiler.build import compile_model
from dlrmc.frontend.arch import Arch
from dlrmc.frontend.model import DLRM
from dlrmc.runtime import load

torch.set_num_threads(2)
BUCKETS = (4, 16)


def rewrite_manifest(art, edit) -> None:
    """Edit an artifact's manifest as a deliberate tamperer would (or an older dlrmc wrote
    it): ``edit(manifest dict)``, then the digest file rewritten to match, so the reader's
    own field checks are what is tested."""
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    data = json.dumps(m).encode()
    (art / "manifest.json").write_bytes(data)
    (art / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")


# A manifest with no model in it, for tests of the artifact writer alone.
BARE_MANIFEST = Manifest(arch=None, entry="main", inputs=[], target={})


def make_batch(arch: Arch, batch: int, rng: np.random.Generator, max_bag: int = 3,
               empty: float = 0.2, index_dtype=np.int64):
    """A batch in the reference layout with varied bag sizes (0..max_bag) and empty bags."""
    dense = rng.standard_normal((batch, arch.num_dense)).astype(np.float32)
    offsets, indices = [], []
    for rows in arch.embedding_sizes:
        sizes = rng.integers(0, max_bag + 1, batch)
        sizes[rng.random(batch) < empty] = 0
        offsets.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        indices.append(rng.integers(0, rows, int(sizes.sum())).astype(index_dtype))
    return dense, np.stack(offsets).astype(index_dtype), indices


def run(*cmd, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run a command line as a user would; with ``check``, fail with its output if it fails."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                         **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def torch_predict(model: torch.nn.Module, dense, offsets, indices) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(dense), torch.from_numpy(offsets),
                     [torch.from_numpy(i) for i in indices]).numpy()


class Compiled:
    """A model, its arch and its loaded artifact."""

    def __init__(self, arch: Arch, path, seed: int = 0):
        self.arch = arch
        self.model = DLRM(arch, seed=seed).eval()
        self._perturb()
        # Small buckets, so the batches the tests run take every path: exact bucket, padded
        # bucket, split over the largest bucket, and the any-batch entry.
        compile_model(self.model, arch, "llvm", str(path), log=lambda _: None,
                      buckets=BUCKETS)
        self.path = path
        self.runtime = load(str(path))

    def _perturb(self):
        # Learned pooling weights start at 1; make them matter.
        g = torch.Generator().manual_seed(1)
        for name, p in self.model.named_parameters():
            if name.startswith("v_W_l"):
                p.data = torch.rand(p.shape, generator=g) * 2 - 0.5


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """compiled(arch) -> Compiled, built once per architecture per session."""
    cache: dict = {}

    def get(arch: Arch) -> Compiled:
        if arch not in cache:
            cache[arch] = Compiled(arch, tmp_path_factory.mktemp("artifact") / "model")
        return cache[arch]

    return get


TINY = Arch(4, (10, 7, 5), (6, 8, 4), (5, 1))

# x86 targets from widest to narrowest: tests compile for any of them but run only what this
# CPU can run (this project's machines differ: some have AVX-512, some only AVX2 + FMA).
X86_TARGETS = ("llvm -mcpu=sapphirerapids", "llvm -mcpu=skylake-avx512", "llvm -mcpu=haswell")


def host_runs(target: str) -> bool:
    """Whether this CPU can run code compiled for ``target``."""
    from dlrmc.artifact import ArtifactError
    from dlrmc.runtime.devices import check_cpu
    from dlrmc.targets import parse_target, requirements
    try:
        check_cpu(requirements(parse_target(target)))
    except ArtifactError:
        return False
    return True


def widest_runnable_target() -> str:
    """The widest of ``X86_TARGETS`` this CPU runs (AVX-512 where it has it)."""
    return next(t for t in X86_TARGETS if host_runs(t))


def foreign_target() -> str:
    """A target whose code this CPU cannot run (AMX and AVX512-FP16 on an AVX-512 machine
    without them, AVX-512 on an AVX2-only one); skips where the CPU runs them all."""
    foreign = [t for t in X86_TARGETS if not host_runs(t)]
    if not foreign:
        pytest.skip("this CPU runs every x86 target the tests know")
    return foreign[-1]


@pytest.fixture(scope="session")
def tiny_cuda_artifact(tmp_path_factory):
    """The tiny preset built for ``cuda -arch=sm_90`` with bucket 4 (needs nvcc, not a GPU)."""
    import shutil

    from dlrmc.frontend.arch import PRESETS
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    path = tmp_path_factory.mktemp("cuda") / "tiny"
    compile_model(DLRM(PRESETS["tiny"], seed=1).eval(), PRESETS["tiny"], "cuda -arch=sm_90",
                  str(path), log=lambda _: None, buckets=(4,))
    return path


@pytest.fixture(scope="session")
def stub_libcuda(tmp_path_factory) -> str:
    """A folder holding a libcuda.so.1 whose driver calls (those TVM's CUDA runtime links) all
    fail with "no device": on LD_LIBRARY_PATH, TVM's CUDA runtime loads where no driver
    exists, so its CUDA module loader can read an artifact."""
    import os
    import re
    import shutil
    import subprocess

    import tvm
    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if not (os.path.isfile(lib) and shutil.which("gcc") and shutil.which("nm")):
        pytest.skip("needs TVM's CUDA runtime, gcc and nm")
    folder = tmp_path_factory.mktemp("stub-libcuda")
    nm = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True)
    symbols = sorted(set(re.findall(r"\bU (cu[A-Z]\w*)", nm.stdout)))
    (folder / "stub.c").write_text("".join(f"int {name}(void) {{ return 100; }}\n"
                                           for name in symbols))
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(folder / "libcuda.so.1"), str(folder / "stub.c")], check=True)
    return str(folder)
