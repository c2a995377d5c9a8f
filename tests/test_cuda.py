"""CUDA: the GPU kernels' indexing (run serially on the CPU) against the numpy oracles, CUDA
artifacts built here with compiled device code for the named arch and read by TVM's own CUDA
loader, the GPU check's bundle rehearsed on the CPU, and, where a GPU exists, CUDA artifacts
against PyTorch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm

from dlrmc.bench import gpu, gpu_kernels
from dlrmc.compiler.build import compile_model
from dlrmc.frontend.arch import PRESETS, Arch
from dlrmc.frontend.model import DLRM
from dlrmc.runtime.batch import random_batch
from dlrmc.runtime.devices import toolkit_candidates
from dlrmc.targets.cuda import fatbin_archs

CPU = tvm.target.Target({"kind": "llvm"})
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def cpu_kernels():
    """Every GPU kernel case built with its loops serial (``bind=False``) for the CPU."""
    return gpu_kernels.build(CPU, bind=False)


def test_gpu_kernel_cases_match_the_oracles(cpu_kernels):
    """The indexing of the GPU kernels (all bag modes, weighted, padding, include_last_offset,
    int32 indices, 26 tables over many blocks, dims 1..200; the interaction with 2..40
    features, with and without the diagonal and x) against the numpy oracles: the same cases
    and harness the GPU check runs on the GPU."""
    worst = gpu_kernels.run(cpu_kernels, tvm.cpu())
    assert len(worst) == len(gpu_kernels.CASES) >= 40
    assert not gpu_kernels.failures(worst), gpu_kernels.failures(worst)


def test_gpu_kernel_harness_reports_a_wrong_kernel(cpu_kernels):
    """A case whose oracle disagrees with its kernel (the interaction's diagonal flipped, a
    bag mode changed) is reported, not passed."""
    flip = {"inter_f5_d16_x_n9": {"itself": True}, "bags_d16_sum_int64_t3_n37": {"mode": "max"}}
    cases = [dict(c, **flip.get(c["name"], {})) for c in gpu_kernels.CASES]
    bad = gpu_kernels.failures(gpu_kernels.run(cpu_kernels, tvm.cpu(), cases))
    assert sorted(b.split(":")[0] for b in bad) == sorted(flip)


@needs_nvcc
@pytest.mark.parametrize("target,arch", [("cuda -arch=sm_90", "sm_90"),
                                         ("nvidia/nvidia-h100", "sm_90a"),
                                         ("cuda -arch=sm_80", "sm_80")])
def test_cuda_artifact_carries_device_code_for_its_arch(tmp_path, target, arch):
    model = DLRM(PRESETS["tiny"], seed=1).eval()
    manifest = compile_model(model, model.arch, target, str(tmp_path / "a"), log=lambda _: None,
                             buckets=(64,))
    assert manifest.target["resolved"]["kind"] == "cuda"
    assert manifest.target["requires"] == {"device": "cuda", "device_type": 2,
                                              "cuda_arch": arch}
    library = (tmp_path / "a" / "model.so").read_bytes()
    assert fatbin_archs(library) == [arch]
    assert b"__global__" not in library            # no CUDA source left to compile at load
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["buckets"] == {
        "64": "main_b64"}


@needs_nvcc
@pytest.mark.parametrize("check", [gpu.CHECK_DCN, gpu.CHECK_PROJECTION], ids=["dcn", "projection"])
def test_torchrecs_interactions_compile_for_cuda(tmp_path, check):
    """DLRM_DCN's cross layers and DLRM_Projection's branches on CUDA: dense layers as Relax ops
    for dlight, our GPU embedding kernel; device code for the arch, no GPU needed to build (the
    GPU check bundle runs them against PyTorch there, and rehearses that here on the CPU)."""
    arch = Arch.from_dict(check["arch"])
    compile_model(DLRM(arch, seed=1).eval(), arch, "cuda -arch=sm_90", str(tmp_path / "a"),
                  log=lambda _: None, buckets=(64,))
    assert fatbin_archs((tmp_path / "a" / "model.so").read_bytes()) == ["sm_90"]


def test_cuda_artifact_is_refused_without_a_gpu(tmp_path):
    if tvm.cuda(0).exist or shutil.which("nvcc") is None:
        pytest.skip("needs a machine with nvcc and no GPU")
    from dlrmc.artifact import ArtifactError
    from dlrmc.runtime import load
    res = subprocess.run(["dlrm-compile", "--preset", "tiny", "--target", "cuda -arch=sm_90",
                          "--buckets", "none", "-o", str(tmp_path / "a"), "--check", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "--check skipped" in res.stderr, res.stderr   # build stands
    with pytest.raises(ArtifactError, match=r"built for cuda \(cuda_arch sm_90\) and cannot run here"):
        load(str(tmp_path / "a"))


LOADER_PROBE = """
import json, sys, tvm
from dlrmc.runtime.devices import device_unavailable
reason = device_unavailable("cuda")
cuda = []
def walk(m):
    cuda.extend([m] if m.kind == "cuda" else [])
    for i in m.imports:
        walk(i)
walk(tvm.runtime.load_module(sys.argv[1]))
names = json.loads(sys.argv[2])
print(json.dumps({"reason": reason, "modules": len(cuda),
                  "implemented": [n for n in names if cuda and cuda[0].implements_function(n)]}))
"""


def test_cuda_artifact_loads_through_tvms_cuda_loader(tiny_cuda_artifact, stub_libcuda):
    """The device code we repack (a fatbin in place of CUDA source) is read by TVM's own CUDA
    module loader: loading the artifact's library gives one CUDA module that implements
    every kernel of the fatbin, ours among them. The driver is stubbed out, so this runs
    without a GPU; only the launch is left to the GPU check."""
    if tvm.cuda(0).exist:
        pytest.skip("a GPU is here: test_cuda_artifact_matches_pytorch runs the artifact")
    library = tiny_cuda_artifact / "model.so"
    kernels = sorted(set(re.findall(rb"\.nv\.info\.(\w+)", library.read_bytes())))
    kernels = [k.decode() for k in kernels]
    assert {"embedding_bags_4_b4_kernel", "dot_interaction_gpu_kernel"} <= set(kernels)
    env = dict(os.environ, LD_LIBRARY_PATH=stub_libcuda + os.pathsep + os.environ.get(
        "LD_LIBRARY_PATH", ""))
    res = subprocess.run([sys.executable, "-c", LOADER_PROBE, str(library),
                          json.dumps(kernels + ["no_such_kernel"])],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["reason"] != "no cuda device found":
        pytest.skip(f"TVM's CUDA runtime does not load here: {out['reason']}")
    assert out["modules"] == 1
    assert out["implemented"] == kernels      # all of them, and not the made-up name


def test_gpu_check_bundle_rehearsed_on_the_cpu(tmp_path):
    """The GPU check's bundle, built for the CPU, runs through scripts/gpu_check.sh exactly as
    on the GPU machine: TVM's runtime alone (the bundle's copy, without libtvm_compiler.so),
    dlrmc's code from the bundle, the kernels' library against the oracles, the C++ runner
    built there against the bundle's runtime, and the artifact (weights remade from the seed)
    run by both runtimes against PyTorch, for the reference DLRM and TorchRec's DCN."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    bundle = tmp_path / "bundle"
    checks = (gpu.CHECK, gpu.CHECK_DCN)   # projection: the same paths (its CUDA build: above)
    gpu.prepare(str(bundle), "llvm", python=None, models=checks)
    assert not list(bundle.rglob("libtvm_compiler.so"))
    assert (bundle / "artifacts" / "tiny" / "weights.bin").stat().st_size == 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(["bash", os.path.join(root, "scripts", "gpu_check.sh"), "run",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, GPU_BUNDLE=str(bundle)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"from {bundle / 'site' / 'tvm'}: runtime only" in res.stdout
    assert f"kernels: {len(gpu_kernels.CASES)} cases match the numpy oracles on cpu" in res.stdout
    assert "C++ runner: built" in res.stdout
    for check in checks:
        assert (f"check {check['name']}: the Python runtime and the C++ runner match PyTorch "
                f"eager on cpu") in res.stdout
    assert (tmp_path / "out" / "gpu_check.log").read_text() == res.stdout


def test_cuda_runtime_library_found_under_cuda_home(tmp_path):
    lib = tmp_path / "cuda" / "lib64"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.13").write_bytes(b"")
    env = {"CUDA_HOME": str(tmp_path / "cuda")}
    assert toolkit_candidates("libcudart.so.13", env)[0] == str(lib / "libcudart.so.13")
    assert str(lib / "libcudart.so.12") not in toolkit_candidates("libcudart.so.12", env)


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
