"""Backends (``dlrmc.targets.backend``): a new one, defined in this module alone, compiles and
runs a DLRM through the same compiler and runtime; each backend's refusals are one table."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from dlrmc.compiler.build import compile_model
from dlrmc.frontend.arch import Arch
from dlrmc.frontend.model import DLRM
from dlrmc.runtime import load
from dlrmc.targets import CpuBackend, backend_for, parse_target, register, unregister

from conftest import make_batch, run, torch_predict


class SerialCpu(CpuBackend):
    """A toy backend: llvm targets asked for one core (``-num-cores=1``) get every parallel
    loop turned serial before code generation."""

    name = "cpu-serial"
    built: list = []

    def matches(self, target) -> bool:
        return target.kind.name == "llvm" and int(target.attrs.get("num-cores", 0)) == 1

    def build(self, mod, target, tuning_log, expect, log):
        mod, summary = self.schedule(mod, target, tuning_log, expect, log)
        kernels = [(gv, f) for gv, f in mod.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc)]
        parallel = [(gv, f.script()) for gv, f in kernels if "T.parallel(" in f.script()]
        for gv, text in parallel:           # every parallel loop made serial
            mod[gv] = tvm.script.from_source(text.replace("T.parallel(", "T.serial("))
        left = sum("T.parallel(" in f.script() for f in mod.functions.values()
                   if isinstance(f, tvm.tirx.PrimFunc))
        self.built.append((len(parallel), left))
        return tvm.compile(mod, target), summary


def test_a_backend_added_in_one_module_compiles_and_runs_a_dlrm(tmp_path):
    arch = Arch(8, (40, 30, 20), (13, 64, 8), (32, 1))
    model = DLRM(arch, seed=3).eval()
    toy = register(SerialCpu())
    try:
        assert backend_for(parse_target("llvm -num-cores=1")) is toy
        assert backend_for(parse_target("llvm -num-cores=2")) is not toy
        compile_model(model, arch, "llvm -num-cores=1", str(tmp_path / "a"), log=lambda _: None,
                      buckets=(64,))
    finally:
        unregister(toy)
    (before, after), = toy.built
    assert before > 0 and after == 0     # kernels with parallel loops, all made serial
    runtime = load(str(tmp_path / "a"))
    rng = np.random.default_rng(2)
    for batch in (1, 64, 300):
        dense, offsets, indices = make_batch(arch, batch, rng)
        np.testing.assert_allclose(runtime.predict(dense, offsets, indices),
                                   torch_predict(model, dense, offsets, indices),
                                   rtol=1e-5, atol=2e-6)
    assert backend_for(parse_target("llvm -num-cores=1")).name == "cpu"   # gone again


@pytest.mark.parametrize("flags,message", [
    (["--emb-quant", "int8"], "--emb-quant is not available for CUDA targets yet"),
    (["--precision", "bf16"], "--precision bf16/fp16 is not available for CUDA targets yet"),
    (["--mlp-quant", "int8", "--calibration-data", "x.npz"],
     "--mlp-quant is not available for CUDA targets yet"),
    (["--tuning-log", "some.tune"], "tuning logs for CUDA targets are not supported yet"),
])
def test_a_backend_refuses_what_it_cannot_do_with_one_message(tmp_path, flags, message):
    res = run("dlrm-compile", "--target", "cuda -arch=sm_90", "--preset", "tiny", *flags, "-o",
              tmp_path / "out", check=False, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_no_module_outside_targets_decides_by_target_kind():
    """Target decisions live in the backends: the compiler, runtimes, frontend and benches
    ask a backend (or the manifest), never a kind string."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    pattern = re.compile(r'kind\.name|"cuda"|is_cuda|kDLCUDA')
    hits = [f"{path.relative_to(root)}:{n}" for folder in ("compiler", "runtime", "frontend", "bench")
            for path in sorted((root / folder).rglob("*")) if path.suffix in (".py", ".cc", ".h")
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
