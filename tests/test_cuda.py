"""CUDA: the GPU kernels' indexing (run serially on the CPU) against the numpy oracles, CUDA
artifacts built here with compiled device code for the named arch, and, where a GPU exists,
CUDA artifacts against PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import tvm

from dlrmc.compiler.build import compile_model
from dlrmc.frontend.arch import PRESETS, Arch
from dlrmc.frontend.model import DLRM
from dlrmc.runtime.batch import random_batch
from dlrmc.schedules import reference as ref
from dlrmc.schedules.gpu import dot_interaction_gpu_kernel, embedding_bags_gpu_kernel
from dlrmc.schedules.interaction import num_pairs
from dlrmc.targets.cuda import fatbin_archs

CPU = tvm.target.Target({"kind": "llvm"})
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def _cpu_build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), CPU)["main"]


@pytest.mark.parametrize("dim", [1, 3, 16, 64, 200])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False),
                                           ("max", False)])
def test_gpu_embedding_bags_indexing(dim, mode, weighted):
    rng = np.random.default_rng(dim)
    tables, batch = 3, 37
    rows = [5, 40, 11]
    weights = [rng.standard_normal((r, dim)).astype(np.float32) for r in rows]
    sizes = rng.integers(0, 5, (tables, batch))
    offsets = np.concatenate([np.zeros((tables, 1), np.int64), np.cumsum(sizes, 1)[:, :-1]], 1)
    indices = [rng.integers(0, r, int(s.sum())) for r, s in zip(rows, sizes)]
    psw = [rng.standard_normal(len(i)).astype(np.float32) for i in indices] if weighted else []
    fn = _cpu_build(embedding_bags_gpu_kernel(dim, mode, weighted, "int64", False, None,
                                              (0, 1, 2), None, bind=False))
    outs = [tvm.runtime.tensor(np.full((batch, dim), np.nan, np.float32)) for _ in rows]
    fn(*[tvm.runtime.tensor(a) for a in weights + indices + [offsets] + psw], *outs)
    for k in range(tables):
        want = ref.embedding_bag(weights[k], indices[k], offsets[k], mode,
                                 psw[k] if weighted else None)
        np.testing.assert_allclose(outs[k].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=str(k))


def test_gpu_embedding_bag_single_table_last_offset_and_padding():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 8)).astype(np.float32)
    idx = rng.integers(0, 20, 30)
    off = np.array([0, 4, 4, 17, 30])
    fn = _cpu_build(embedding_bags_gpu_kernel(8, "mean", False, "int64", True, 3, None, None,
                                              bind=False))
    out = tvm.runtime.tensor(np.zeros((4, 8), np.float32))
    fn(*[tvm.runtime.tensor(a) for a in (w, idx, off)], out)
    np.testing.assert_allclose(out.numpy(), ref.embedding_bag(w, idx, off, "mean", None, True, 3),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("features", [2, 5, 27, 40])
@pytest.mark.parametrize("itself", [False, True])
@pytest.mark.parametrize("prepend", [False, True])
def test_gpu_interaction_indexing(features, itself, prepend):
    rng = np.random.default_rng(features)
    t = rng.standard_normal((9, features, 16)).astype(np.float32)
    fn = _cpu_build(dot_interaction_gpu_kernel(features, 16, itself, prepend, None, "fp32",
                                               bind=False))
    width = num_pairs(features, itself) + (16 if prepend else 0)
    out = tvm.runtime.tensor(np.full((9, width), np.nan, np.float32))
    fn(tvm.runtime.tensor(t), out)
    np.testing.assert_allclose(out.numpy(), ref.dot_interaction(t, itself, prepend), rtol=1e-5,
                               atol=1e-5)


@needs_nvcc
@pytest.mark.parametrize("target,arch", [("cuda -arch=sm_90", "sm_90"),
                                         ("nvidia/nvidia-h100", "sm_90a"),
                                         ("cuda -arch=sm_80", "sm_80")])
def test_cuda_artifact_carries_device_code_for_its_arch(tmp_path, target, arch):
    model = DLRM(PRESETS["tiny"], seed=1).eval()
    manifest = compile_model(model, model.arch, target, str(tmp_path / "a"), log=lambda _: None,
                             buckets=(64,))
    assert manifest["target"]["resolved"]["kind"] == "cuda"
    assert manifest["target"]["requires"] == {"cuda_arch": arch}
    library = (tmp_path / "a" / "model.so").read_bytes()
    assert fatbin_archs(library) == [arch]
    assert b"__global__" not in library            # no CUDA source left to compile at load
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["buckets"] == {
        "64": "main_b64"}


def test_cuda_artifact_is_refused_without_a_gpu(tmp_path):
    if tvm.cuda(0).exist or shutil.which("nvcc") is None:
        pytest.skip("needs a machine with nvcc and no GPU")
    from dlrmc.artifact import ArtifactError
    from dlrmc.runtime import load
    res = subprocess.run(["dlrm-compile", "--preset", "tiny", "--target", "cuda -arch=sm_90",
                          "--buckets", "none", "-o", str(tmp_path / "a"), "--check", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "--check skipped" in res.stderr, res.stderr   # build stands
    with pytest.raises(ArtifactError, match=r"built for CUDA \(sm_90\) and cannot run here"):
        load(str(tmp_path / "a"))


@pytest.mark.gpu
@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU")
def test_cuda_artifact_matches_pytorch(tmp_path):
    from dlrmc.runtime import load
    arch = Arch(16, (1000, 500, 200, 50), (13, 64, 16), (64, 1))
    model = DLRM(arch, seed=2).eval()
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    compile_model(model, arch, f"cuda -arch=sm_{major}{minor}", str(tmp_path / "a"),
                  log=lambda _: None, buckets=(4, 64))
    compiled = load(str(tmp_path / "a"))
    for batch in (1, 3, 4, 64, 100):
        dense, offsets, indices = random_batch(arch.to_dict(), batch, bag_size=3, seed=batch)
        with torch.no_grad():
            want = model(torch.from_numpy(dense), torch.from_numpy(offsets),
                         [torch.from_numpy(i) for i in indices]).numpy()
        np.testing.assert_allclose(compiled.predict(dense, offsets, indices), want, rtol=1e-4,
                                   atol=1e-5, err_msg=f"batch {batch}")
