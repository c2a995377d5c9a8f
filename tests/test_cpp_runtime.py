"""The C++ runner (runtime/cpp, CMake): x86 natively, aarch64 artifacts under qemu-aarch64,
both against PyTorch on the same batches; its input validation and artifact checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlrmc.compiler.build import compile_model
from dlrmc.frontend.arch import PRESETS, Arch
from dlrmc.frontend.model import DLRM
from dlrmc.runtime.batch import LAYOUTS, random_batch, write_raw_batch

SOURCE = os.path.join(os.path.dirname(__file__), "..", "runtime", "cpp")
ARM_LIBS = os.environ.get("DLRMC_AARCH64_TVM_LIBS",
                          os.path.expanduser("~/.cache/dlrmc/aarch64-tvm"))
ARM_SYSROOT = "/usr/aarch64-linux-gnu"
ARCH = Arch(8, (100, 50, 20, 10), (13, 32, 8), (32, 16, 1))
ARM_TARGETS = {
    "neon": "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1 -mattr=+neon",
    "sve": "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-v1 -mattr=+sve",
}


def _cmake(build_dir, *extra) -> str:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    for cmd in (["cmake", "-S", SOURCE, "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
                 *extra], ["cmake", "--build", str(build_dir), "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
    return str(build_dir / "dlrmc_run")


@pytest.fixture(scope="module")
def model():
    return DLRM(ARCH, seed=11).eval()


def _run(cmd, artifact, batch_dir, env=None):
    return subprocess.run([*cmd, str(artifact), str(batch_dir)], capture_output=True, text=True,
                          timeout=600, env=env)


def _check_against_pytorch(cmd, artifact, model, tmp_path, env=None) -> None:
    """Batches on every bucket path: exact (4), padded (3), split (13, 40), main (1); in the
    runner's three input layouts in turn."""
    for n, size in enumerate((1, 3, 4, 13, 40)):
        batch = random_batch(ARCH.to_dict(), size, bag_size=3, seed=size, fixed=False,
                             empty_bags=0.2)
        write_raw_batch(tmp_path / f"b{size}", batch, LAYOUTS[n % len(LAYOUTS)])
        res = _run(cmd, artifact, tmp_path / f"b{size}", env)
        assert res.returncode == 0, res.stderr
        got = np.array([float(v) for v in res.stdout.split()], np.float32)
        dense, offsets, indices = batch
        with torch.no_grad():
            want = model(torch.from_numpy(dense), torch.from_numpy(offsets),
                         [torch.from_numpy(i) for i in indices]).numpy()[:, 0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"batch {size}")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return _cmake(tmp_path_factory.mktemp("cpp-build"))


def test_native_runner_matches_pytorch(native, model, tmp_path):
    compile_model(model, ARCH, None, str(tmp_path / "x86"), log=lambda _: None, buckets=(4, 8))
    _check_against_pytorch([native], tmp_path / "x86", model, tmp_path)


@pytest.mark.parametrize("interaction", [
    {}, {"interaction_op": "dcn", "dcn_layers": 2, "dcn_low_rank": 3},
    {"interaction_op": "projection", "proj_branch1": (16, 8), "proj_branch2": (24,)}],
    ids=["dot", "dcn", "projection"])
def test_native_runner_gives_probabilities_of_a_logit_model(native, tmp_path, interaction):
    """A model ending in logits (TorchRec's DLRM, and DLRM_DCN with its cross layers' weights
    checked against the architecture): the runner applies the sigmoid."""
    import dataclasses

    arch = dataclasses.replace(ARCH, output="logit", **interaction)
    model = DLRM(arch, seed=5).eval()
    compile_model(model, arch, None, str(tmp_path / "logit"), log=lambda _: None, buckets=(4,))
    batch = random_batch(arch.to_dict(), 6, bag_size=2, seed=2)
    write_raw_batch(tmp_path / "b", batch, "kjt")
    res = _run([native], tmp_path / "logit", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    got = np.array([float(v) for v in res.stdout.split()], np.float32)
    dense, offsets, indices = batch
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(offsets),
                                   [torch.from_numpy(i) for i in indices])).numpy()[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_native_runner_rejects_bad_input_and_artifacts(native, model, tmp_path):
    art = tmp_path / "x86"
    compile_model(model, ARCH, None, str(art), log=lambda _: None, buckets=(4,))
    dense, offsets, indices = random_batch(ARCH.to_dict(), 4, bag_size=2, seed=0)
    bad_index = [indices[0], indices[1], np.array([5, 20, 1, 2, 3, 4, 5, 6]), indices[3]]
    cases = {   # (batch, layout, message)
        "index": ((dense, offsets, bad_index), "flat",
                  "indices[17] = 20 (table 2, position 1) is out of range for table 2"),
        "index kjt": ((dense, offsets, bad_index), "kjt", "indices[17] = 20 (table 2, position 1)"),
        "index reference": ((dense, offsets, bad_index), "reference", "indices[17] = 20"),
        "offsets": ((dense, np.array(offsets)[:, ::-1].copy(), indices), "reference",
                    "lS_o[0] must start at 0"),
        "dense": ((dense[:, :5], offsets, indices), "flat", "dense_x"),
    }
    for name, (batch, layout, message) in cases.items():
        write_raw_batch(tmp_path / name, batch, layout)
        res = _run([native], art, tmp_path / name)
        assert res.returncode == 2 and message in res.stderr, (name, res.stderr)
    for name, edit, message in [
            ("falling", lambda o: o.__setitem__(3, o[2] - 1), "offsets decreases at position 3"),
            ("short", lambda o: o.__setitem__(-1, o[-1] - 1), "offsets[16] = 31, but indices holds 32 values"),
            ("lengths", None, "lengths[5] = -2 is negative")]:
        write_raw_batch(tmp_path / name, (dense, offsets, indices), "kjt" if edit is None
                        else "flat")
        if edit is None:
            lengths = np.fromfile(tmp_path / name / "lengths.bin", "<i8")
            lengths[5] = -2
            lengths.tofile(tmp_path / name / "lengths.bin")
        else:
            o = np.fromfile(tmp_path / name / "offsets.bin", "<i8")
            edit(o)
            o.tofile(tmp_path / name / "offsets.bin")
        res = _run([native], art, tmp_path / name)
        assert res.returncode == 2 and message in res.stderr, (name, res.stderr)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    res = _run([native], art, tmp_path / "index")
    assert res.returncode == 2 and "format version" in res.stderr
    (art / "manifest.json").write_text("{not json")
    res = _run([native], art, tmp_path / "index")
    assert res.returncode == 2 and "corrupt" in res.stderr
    res = _run([native], tmp_path / "nowhere", tmp_path / "index")
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_native_runner_checks_what_the_python_runtime_checks(native, model, tmp_path):
    """The manifest's digest, sizes and file digests, the weights against arch, plain file
    names, the format version's type, and CPU features: each refused with its reason."""
    from conftest import foreign_target, rewrite_manifest
    art = tmp_path / "x86"
    compile_model(model, ARCH, None, str(art), log=lambda _: None, buckets=(4,))
    write_raw_batch(tmp_path / "b", random_batch(ARCH.to_dict(), 3, bag_size=2, seed=1))
    assert _run([native], art, tmp_path / "b").returncode == 0
    cases = {
        "manifest edited": (lambda a: (a / "manifest.json").write_text(
            (a / "manifest.json").read_text().replace('"entry": "main"', '"entry":  "main"')),
            "manifest.json does not match manifest.sha256"),
        "rows raised": (lambda a: rewrite_manifest(
            a, lambda m: m["arch"]["embedding_sizes"].__setitem__(0, 10 ** 6)),
            "weight emb_l.0.weight does not have the dtype and shape arch says"),
        "outside": (lambda a: rewrite_manifest(a, lambda m: m["weights"].update(file="../w.bin")),
                    "weights.file '../w.bin' is not a plain file name"),
        "version bool": (lambda a: rewrite_manifest(a, lambda m: m.update(format_version=True)),
                         "has format version true; this runner reads version 3"),
        "truncated": (lambda a: os.truncate(a / "model.so", 1000), "model.so is 1000 bytes"),
        "nested deep": (lambda a: (a / "manifest.json").write_text("[" * 300000 + "]" * 300000),
                        "nested 300000 levels deep"),
        "entry renamed": (lambda a: rewrite_manifest(
            a, lambda m: m["buckets"].update({"4": "nope"})),
            'buckets.4 "nope" is not a function of model.so'),
        "bucket not an entry": (lambda a: rewrite_manifest(
            a, lambda m: m["buckets"].update({"4": "transform_params"})),
            'manifest.json: buckets.4 "transform_params" does not run a batch of 4'),
        "bucket absurd": (lambda a: rewrite_manifest(
            a, lambda m: m["buckets"].update({str(10 ** 8): "main"})),
            "buckets must map batch sizes (1 to 65536)"),
        "entry a bucket": (lambda a: rewrite_manifest(
            a, lambda m: m.update(entry=m["buckets"]["4"])),
            'manifest.json: entry "main_b4" does not run a batch of 2'),
        "flipped byte": (lambda a: (a / "weights.bin").write_bytes(
            bytes([(a / "weights.bin").read_bytes()[0] ^ 1]) + (a / "weights.bin").read_bytes()[1:]),
            "weights.bin is corrupt (sha256 mismatch)"),
    }
    for name, (tamper, message) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(art, copy)
        tamper(copy)
        res = _run([native], copy, tmp_path / "b")
        assert res.returncode == 2 and message in res.stderr, (name, res.stderr)
    target = foreign_target()
    compile_model(model, ARCH, target, str(tmp_path / "foreign"), log=lambda _: None,
                  buckets=(4,))
    res = _run([native], tmp_path / "foreign", tmp_path / "b")
    assert res.returncode == 2 and "needs CPU features this CPU lacks" in res.stderr, res.stderr


def test_native_runner_refuses_a_cuda_artifact_without_a_gpu(native, tiny_cuda_artifact,
                                                            stub_libcuda, tmp_path):
    """Where no GPU is, the C++ runner says why a CUDA artifact cannot run: no driver (TVM's
    CUDA runtime does not load), or a driver that finds no GPU (stubbed)."""
    import tvm
    if tvm.cuda(0).exist:
        pytest.skip("a GPU is here")
    write_raw_batch(tmp_path / "b", random_batch(PRESETS["tiny"].to_dict(), 2))
    expected = f"{tiny_cuda_artifact} was built for cuda (cuda_arch sm_90) and cannot run here: "
    res = _run([native], tiny_cuda_artifact, tmp_path / "b")
    assert res.returncode == 2 and expected in res.stderr, res.stderr
    res = _run([native], tiny_cuda_artifact, tmp_path / "b", env=dict(
        os.environ, LD_LIBRARY_PATH=stub_libcuda + os.pathsep + os.environ.get(
            "LD_LIBRARY_PATH", "")))
    assert res.returncode == 2 and expected + "no cuda device found" in res.stderr, res.stderr


@pytest.mark.gpu
def test_native_runner_runs_a_cuda_artifact(native, model, tmp_path):
    import tvm
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU")
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    compile_model(model, ARCH, f"cuda -arch=sm_{major}{minor}", str(tmp_path / "gpu"),
                  log=lambda _: None, buckets=(4, 8))
    _check_against_pytorch([native], tmp_path / "gpu", model, tmp_path)


def _arm_tools():
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu "
                    "qemu-user)")
    if not all(os.path.isfile(os.path.join(ARM_LIBS, f))
               for f in ("libtvm_runtime.so", "libtvm_ffi.so")):
        pytest.skip(f"no aarch64 TVM runtime in {ARM_LIBS} (scripts/fetch_aarch64_runtime.sh)")


@pytest.fixture(scope="module")
def arm_runner(tmp_path_factory):
    _arm_tools()
    return _cmake(tmp_path_factory.mktemp("cpp-arm"), "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
                  f"-DTVM_LIB_DIR={ARM_LIBS}", "-DCMAKE_SYSTEM_NAME=Linux",
                  "-DCMAKE_SYSTEM_PROCESSOR=aarch64")


@pytest.mark.parametrize("variant", sorted(ARM_TARGETS))
def test_aarch64_artifact_runs_under_qemu_and_matches_pytorch(arm_runner, model, tmp_path,
                                                              variant):
    art = tmp_path / variant
    compile_model(model, ARCH, ARM_TARGETS[variant], str(art), log=lambda _: None, buckets=(4, 8))
    res = subprocess.run(["file", str(art / "model.so")], capture_output=True, text=True)
    assert "aarch64" in res.stdout or "ARM" in res.stdout, res.stdout
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"]["requires"]["machine"] == "aarch64"
    env = dict(os.environ, QEMU_LD_PREFIX=ARM_SYSROOT, LD_LIBRARY_PATH=ARM_LIBS,
               QEMU_CPU="max", TVM_NUM_THREADS="2")
    _check_against_pytorch(["qemu-aarch64", arm_runner], art, model, tmp_path, env)
