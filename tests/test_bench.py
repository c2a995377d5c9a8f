"""dlrm-bench runs end to end and reports every system it was asked for."""

from __future__ import annotations

import json
import subprocess

import pytest


def test_bench_reports_ours_and_peers(tmp_path):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    res = subprocess.run(["dlrm-bench", "--preset", "tiny", "--batches", "1,8", "--repeat", "3",
                          "--peers", "eager", "--json", str(out), "--markdown", str(md)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 8]
    for r in data["results"]:
        assert set(r["systems"]) == {"dlrmc", "dlrmc-call", "eager"}
        for s in r["systems"].values():
            assert s["median_us"] > 0 and s["p99_us"] >= s["median_us"]
        assert r["bound_us"] > 0 and r["max_abs_diff_vs_eager"] < 1e-5
        # a lower bound: no system beats it
        assert r["bound_us"] < min(s["median_us"] for s in r["systems"].values())
    table = md.read_text()
    assert "| dlrmc (this artifact) |" in table and "| PyTorch eager |" in table
    assert "| dlrmc, compiled call only |" in table and "time `predict`" in table
    assert "lower bound" in table and "FLOPs at the FMA peak measured here" in table
    assert "A float32 bound" not in table          # an fp32 artifact: the bound is its own
    from dlrmc.bench.cli import markdown
    assert "this artifact's MLPs compute in bf16" in markdown(data["results"], "bf16")
    layers = data["layers"]
    assert layers["fma_peak_flops"] > 1e9 and layers["batch"] == 8
    # on this CPU the bound's FLOP rate is the probe's peak, the same measurement
    assert data["bound_flops_source"] == "fma_peak"
    assert data["bound_flops"] == layers["fma_peak_flops"]
    assert "| bot 13->32 |" in layers["table"] and "| top 32->1 |" in layers["table"]
    assert "FMA peak (built-in probe" in res.stdout


def test_the_aot_inductor_peer_computes_the_model():
    """AOTInductor compiles the model as users have it (reference layout, ATen's bags)."""
    import numpy as np
    import torch

    from dlrmc.bench.peers import aot_inductor
    from dlrmc.frontend.arch import PRESETS
    from dlrmc.frontend.model import DLRM
    from dlrmc.runtime.batch import random_batch

    arch = PRESETS["tiny"]
    model = DLRM(arch, seed=1).eval()
    peer = aot_inductor(model, arch)
    for batch in (1, 5):
        d, o, i = random_batch(arch.to_dict(), batch, bag_size=2, seed=batch, fixed=False,
                               empty_bags=0.2)
        tb = (torch.from_numpy(d), torch.from_numpy(o), [torch.from_numpy(x) for x in i])
        with torch.no_grad():
            np.testing.assert_allclose(peer(*tb).numpy(), model(*tb).numpy(), atol=1e-6)


def test_graphs_compiled_sees_torch_compile_recompile():
    """The count dlrm-bench uses to mark a peer's time as not trusted moves exactly when
    TorchDynamo compiles (a new static shape), not on a call it has compiled for."""
    import torch

    from dlrmc.bench.peers import graphs_compiled

    f = torch.compile(lambda x: x * 2 + 1, dynamic=False, backend="eager")
    n = graphs_compiled()
    f(torch.ones(3))
    assert graphs_compiled() == n + 1
    f(torch.ones(3))
    assert graphs_compiled() == n + 1
    f(torch.ones(5))
    assert graphs_compiled() == n + 2


def test_bench_rejects_bad_flags_before_any_work(tmp_path, capsys):
    from dlrmc.bench.cli import main

    for args, message in [(["--batches", "0"], "must be positive"),
                          (["--batches", "4,x"], "separated by commas"),
                          (["--peers", "eager,foo"], "unknown peer foo"),
                          (["--threads", "-1"], "--threads must be positive"),
                          (["--markdown", str(tmp_path / "no" / "t.md")], "existing directory")]:
        with pytest.raises(SystemExit) as stop:
            main(["--preset", "tiny", *args, "--json", str(tmp_path / "b.json")])
        assert stop.value.code == 2 and message in capsys.readouterr().err, args
        assert not (tmp_path / "b.json").exists()


def test_bench_names_bad_inputs_without_a_traceback(tmp_path, capsys):
    """A missing checkpoint, artifact or tuning log, an unknown CPU, LoadGen data for another
    model: each an error line and exit 2 (each was a traceback). Run in process: each fails
    before any timing."""
    import numpy as np

    from dlrmc.bench.cli import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "criteo.npz", X_int=rng.integers(0, 9, (1400, 13)),
             X_cat=rng.integers(0, 5, (1400, 26)), y=rng.integers(0, 2, 1400),
             counts=np.full(26, 5))
    for args, message in [
            (["--load-model", str(tmp_path / "none.pt")], "checkpoint"),
            (["--preset", "tiny", "--artifact", str(tmp_path / "none")], "does not exist"),
            (["--preset", "tiny", "--tuning-log", str(tmp_path / "none")], "does not exist"),
            (["--preset", "tiny", "--target", "llvm -mcpu=skylake-avx513"], "unknown -mcpu"),
            (["--preset", "tiny", "--loadgen", "offline", "--samples", "16", "--loadgen-data",
              str(tmp_path / "criteo.npz")], "criteo.npz does not fit the model")]:
        assert main([*args, "--peers", "none", "--no-layers"]) == 2, args
        err = capsys.readouterr().err
        assert "dlrm-bench: error: " in err and message in err, (args, err)
