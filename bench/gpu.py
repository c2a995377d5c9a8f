"""The GPU check: CUDA artifacts built here, run there against PyTorch (``scripts/gpu_check.sh``).

``python -m dlrmc.bench.gpu prepare DIR`` (here: TVM's compiler and nvcc, no GPU needed)
compiles, for an H100 (``cuda -arch=sm_90``), our GPU kernels over many configurations
(``gpu_kernels``) and the check's artifacts, and writes a bundle a GPU machine with PyTorch
but no TVM can run: the kernels' library, the artifacts without their weight files (the
weights are remade there from the same seed), TVM's runtime only (the Python package
without ``libtvm_compiler.so``, plus the tvm-ffi wheel for that machine's Python) and
dlrmc's own runtime code.

``python -m dlrmc.bench.gpu run DIR`` (there, with the bundle on PYTHONPATH and
``TVM_USE_RUNTIME_LIB=1``) first runs every kernel case against its numpy oracle and every
artifact against PyTorch eager on the GPU, over batch sizes that take each entry path
(bucket, padded bucket, split, any-batch), then times the benchmark artifact against PyTorch
eager, PyTorch CUDA-graph replay and torch.compile at each batch, with device-resident
inputs, and prints one table (and writes JSON/Markdown).

A bundle prepared with ``--target llvm`` runs the same checks on the CPU, with no
benchmark: a rehearsal of the bundle (runtime-only TVM, remade weights) on a machine
without a GPU; the suite runs it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

SEED = 0
BENCH = {"name": "kaggle-100k", "arch": dict(sparse_feature_size=16,
                                              embedding_sizes=[100_000] * 26,
                                              mlp_bot=[13, 512, 256, 64, 16],
                                              mlp_top=[512, 256, 1]),
         "buckets": [64, 2048]}
CHECK = {"name": "tiny", "arch": dict(sparse_feature_size=8, embedding_sizes=[100, 50, 20, 10],
                                      mlp_bot=[13, 32, 8], mlp_top=[32, 16, 1]),
         "buckets": [4, 64]}
# TorchRec's interactions (logits): DLRM_DCN's low-rank cross layers, DLRM_Projection's branches
CHECK_DCN = {"name": "tiny-dcn", "arch": dict(
    sparse_feature_size=8, embedding_sizes=[100, 50, 20], mlp_bot=[13, 32, 8], mlp_top=[32, 1],
    interaction_op="dcn", dcn_layers=2, dcn_low_rank=4, output="logit"), "buckets": [4, 64]}
CHECK_PROJECTION = {"name": "tiny-projection", "arch": dict(
    sparse_feature_size=8, embedding_sizes=[100, 50, 20], mlp_bot=[13, 32, 8], mlp_top=[32, 1],
    interaction_op="projection", proj_branch1=[16, 16], proj_branch2=[16, 8], output="logit"),
    "buckets": [4, 64]}
CHECKS = (CHECK, CHECK_DCN, CHECK_PROJECTION)
PACKAGES = ("artifact", "bench", "frontend", "runtime", "schedules")  # what runs there
KERNELS = "kernels.so"
BUNDLE = "bundle.json"


def prepare(out: str, target: str = "cuda -arch=sm_90", python: str | None = "3.12",
            models=(*CHECKS, BENCH)) -> None:
    """Write the bundle to ``out``. ``python``: the tvm-ffi wheel for that Python version
    (None: none, the running Python's tvm-ffi serves); ``models``: the artifacts."""
    import tvm
    import tvm_ffi

    from ..compiler.build import compile_model, export_library
    from ..frontend.arch import Arch
    from ..frontend.model import DLRM
    from ..runtime.devices import is_host
    from ..targets import parse_target, requirements
    from . import gpu_kernels

    tgt = parse_target(target)
    device = requirements(tgt)["device"]
    os.makedirs(out, exist_ok=True)
    # on a CPU, the same loops run serially
    kernels = gpu_kernels.build(tgt, bind=not is_host(tvm.device(device)))
    export_library(kernels, tgt, os.path.join(out, KERNELS))
    for spec in models:
        arch = Arch.from_dict(spec["arch"])
        art = os.path.join(out, "artifacts", spec["name"])
        compile_model(DLRM(arch, seed=SEED), arch, target, art,
                      buckets=spec["buckets"], log=lambda _: None)
        open(os.path.join(art, "weights.bin"), "w").close()   # remade there (``run``)
    with open(os.path.join(out, BUNDLE), "w") as f:
        json.dump({"target": target, "device": device,
                   "artifacts": [m["name"] for m in models]}, f, indent=1)
    site = os.path.join(out, "site")
    shutil.rmtree(site, ignore_errors=True)
    tvm_dir = os.path.dirname(tvm.__file__)
    shutil.copytree(tvm_dir, os.path.join(site, "tvm"), ignore=shutil.ignore_patterns(
        "__pycache__", "libtvm_compiler.so", "3rdparty", "include", "src"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(root, pkg), os.path.join(site, "dlrmc", pkg),
                        ignore=shutil.ignore_patterns("__pycache__"))
    open(os.path.join(site, "dlrmc", "__init__.py"), "w").close()
    wheels = os.path.join(out, "wheels")
    os.makedirs(wheels, exist_ok=True)
    if python:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", python, "--platform",
                        "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
                        f"apache-tvm-ffi=={tvm_ffi.__version__}", "-d", wheels], check=True)
    print(f"bundle in {out}: {sum(os.path.getsize(p) for p in glob.glob(out + '/**', recursive=True) if os.path.isfile(p)) / 1e6:.1f} MB")


def _model(manifest):
    import torch

    from ..frontend.arch import Arch
    from ..frontend.model import DLRM

    torch.manual_seed(SEED)
    return DLRM(Arch.from_dict(manifest.arch), seed=SEED).eval()


def _ready(art: str):
    """The artifact with its weights remade from the seed, and the eager model on its device."""
    from ..artifact import read_manifest, replace_weights
    from ..runtime import load

    manifest = read_manifest(art, verify=False, files=False)
    model = _model(manifest)
    if os.path.getsize(os.path.join(art, "weights.bin")) == 0:     # shipped without them
        replace_weights(art, {k: v.numpy() for k, v in model.state_dict().items()},
                        shipped_without=True)
    ours = load(art)
    return ours, model.to(_torch_device(ours.device))


def _torch_device(device) -> str:
    """PyTorch's name for a TVM device: TVM's own ("cuda:0", "cpu:0")."""
    return str(device)


def _torch_batch(batch, device: str):
    import torch
    dense, offsets, indices = batch
    return (torch.from_numpy(dense).to(device), torch.from_numpy(offsets).to(device),
            [torch.from_numpy(i).to(device) for i in indices])


def build_cpp_runner(build_dir: str) -> str:
    """The C++ runner (``runtime/cpp``) built with CMake against the TVM runtime and tvm-ffi
    this Python imports; returns the ``dlrmc_run`` path."""
    import tvm
    import tvm_ffi

    from .. import runtime

    source = os.path.join(os.path.dirname(runtime.__file__), "cpp")
    for cmd in (["cmake", "-S", source, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DTVM_ROOT={os.path.dirname(tvm.__file__)}",
                 f"-DTVM_FFI_ROOT={os.path.dirname(tvm_ffi.__file__)}"],
                ["cmake", "--build", build_dir, "-j8"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise RuntimeError("cmake is not installed") from None
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{(res.stdout + res.stderr)[-2000:]}")
    return os.path.join(build_dir, "dlrmc_run")


def _run_cpp(runner: str, art: str, data) -> np.ndarray:
    import tempfile

    from ..runtime.batch import write_raw_batch

    with tempfile.TemporaryDirectory(prefix="dlrmc-batch-") as tmp:
        write_raw_batch(tmp, data)
        res = subprocess.run([runner, art, tmp], capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise AssertionError(f"dlrmc_run {art}: {res.stderr.strip()[-1000:]}")
    return np.array(res.stdout.split(), np.float32)[:, None]


def check(art: str, runner: str | None = None) -> float:
    """Max |artifact - PyTorch eager| on the artifact's device over batches that take every
    entry path, run by the Python runtime and, given ``runner``, by the C++ runner."""
    import torch

    from ..runtime.batch import random_batch

    ours, model = _ready(art)
    device = _torch_device(ours.device)
    worst = 0.0
    for batch in (1, 3, 4, 64, 63, 100, 2048 + 5):
        data = random_batch(ours.arch, batch, bag_size=3, seed=batch, fixed=False)
        with torch.no_grad():
            want = model.probabilities(*_torch_batch(data, device)).cpu().numpy()
        got = {"python": ours.predict(*data)}
        if runner:
            got["C++"] = _run_cpp(runner, art, data)
        for who, out in got.items():
            diff = float(np.abs(out - want).max())
            worst = max(worst, diff)
            if not diff <= 1e-4:
                raise AssertionError(f"{art} ({who} runtime): batch {batch} differs from "
                                     f"PyTorch by {diff:.3g}")
    return worst


def check_kernels(bundle: str, device) -> int:
    """Every kernel case of the bundle's library against its oracle on ``device``; raises on
    any beyond tolerance, else returns the number of cases."""
    import tvm

    from . import gpu_kernels

    worst = gpu_kernels.run(tvm.runtime.load_module(os.path.join(bundle, KERNELS)), device)
    bad = gpu_kernels.failures(worst)
    if bad:
        raise AssertionError(f"{len(bad)} of {len(worst)} kernel cases differ from the numpy "
                             "oracles: " + "; ".join(bad))
    return len(worst)


def _time(fn, sync, repeat: int) -> float:
    """Median seconds of ``fn`` until the device is done with it."""
    from ..runtime.model import time_calls

    return float(np.median(time_calls(lambda: (fn(), sync()), 5, repeat)))


def bench(art: str, batches, repeat: int) -> list[dict]:
    import torch

    from ..runtime.batch import random_batch

    ours, model = _ready(art)
    rows = []
    for batch in batches:
        data = random_batch(ours.arch, batch, bag_size=1, seed=batch, fixed=True)  # one-hot
        tb = _torch_batch(data, _torch_device(ours.device))
        systems = {}
        run = ours.bind(*data)
        systems["dlrmc"] = _time(run, ours.device.sync, repeat)
        with torch.no_grad():
            systems["eager"] = _time(lambda: model(*tb), torch.cuda.synchronize, repeat)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(*tb)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(*tb)
            systems["cuda_graph"] = _time(graph.replay, torch.cuda.synchronize, repeat)
            compiled = torch.compile(model)
            systems["torch_compile"] = _time(lambda: compiled(*tb), torch.cuda.synchronize,
                                             repeat)
        rows.append({"batch": batch, "us": {k: v * 1e6 for k, v in systems.items()}})
        print(f"B={batch}: " + ", ".join(f"{k} {v * 1e6:,.0f} us" for k, v in systems.items()),
              flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    names = {"dlrmc": "dlrmc (CUDA artifact, TVM runtime only)", "eager": "PyTorch eager",
             "cuda_graph": "PyTorch CUDA-graph replay", "torch_compile": "torch.compile"}
    out = [f"| {device}, median per batch (peer / dlrmc) | "
           + " | ".join(f"B={r['batch']}" for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for key, label in names.items():
        cells = [f"{r['us'][key]:,.0f} us" + ("" if key == "dlrmc" else
                                                f" ({r['us'][key] / r['us']['dlrmc']:.2f}x)")
                 for r in rows]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    goal = ["met" if r["us"]["dlrmc"] <= 0.5 * r["us"]["cuda_graph"] else
            f"missed ({r['us']['dlrmc'] / r['us']['cuda_graph']:.2f} of replay)" for r in rows]
    out.append("| goal: at most half of CUDA-graph replay | " + " | ".join(goal) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlrmc.bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="here: compile the artifacts and write the bundle")
    pp.add_argument("bundle")
    pp.add_argument("--target", default="cuda -arch=sm_90")
    pp.add_argument("--python", default="3.12",
                    help="the GPU machine's Python version, for the tvm-ffi wheel ('none': no "
                         "wheel; the Python that runs the bundle has tvm-ffi)")
    pr = sub.add_parser("run", help="there: the GPU checks, then the benchmark")
    pr.add_argument("bundle")
    pr.add_argument("--batches", default="64,2048")
    pr.add_argument("--repeat", type=int, default=200)
    pr.add_argument("--out", help="folder for gpu_bench.json and gpu_bench.md")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.bundle, args.target, None if args.python == "none" else args.python)
        return 0
    import torch  # first: on a GPU machine it loads the CUDA runtime libraries
    import tvm

    from ..runtime.devices import device_unavailable, is_host

    with open(os.path.join(args.bundle, BUNDLE)) as f:
        bundle = json.load(f)
    arts = os.path.join(args.bundle, "artifacts")
    reason = device_unavailable(bundle["device"])
    if reason:
        print(f"GPU check: the bundle was built for {bundle['device']} and cannot run here: "
              f"{reason}", file=sys.stderr)
        return 2
    device = tvm.device(bundle["device"], 0)
    compiler = tvm.get_global_func("target.build.llvm", allow_missing=True) is not None
    print(f"TVM {tvm.__version__} from {os.path.dirname(tvm.__file__)}: "
          f"{'with its compiler' if compiler else 'runtime only'}", flush=True)
    failed = []

    def step(label: str, fn) -> None:
        """Run one check; a failure is reported and the rest (the benchmark too) still run."""
        try:
            print(f"{label}: {fn()}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported the same way
            failed.append(label)
            print(f"{label}: FAILED: {e}", flush=True)

    step("kernels", lambda: f"{check_kernels(args.bundle, device)} cases match the numpy "
                            f"oracles on {bundle['device']}")
    runner = None

    def cpp():
        nonlocal runner
        runner = build_cpp_runner(os.path.join(args.bundle, "cpp"))
        return f"built ({runner})"

    step("C++ runner", cpp)
    for name in bundle["artifacts"]:
        step(f"check {name}", lambda: (
            f"the Python runtime{' and the C++ runner' if runner else ''} match PyTorch eager "
            f"on {bundle['device']} (max |diff| "
            f"{check(os.path.join(arts, name), runner):.2g})"))
    status = 1 if failed else 0
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    if is_host(device) or BENCH["name"] not in bundle["artifacts"]:
        print("no benchmark: this bundle was not built for a GPU with the benchmark model")
        return status
    rows = bench(os.path.join(arts, BENCH["name"]), [int(b) for b in args.batches.split(",")],
                 args.repeat)
    table = markdown(rows, torch.cuda.get_device_name())
    print("\n" + table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(table + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
