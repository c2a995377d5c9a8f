"""dlrm-bench runs end to end and reports every system it was asked for."""

from __future__ import annotations

import json
import subprocess


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
    table = md.read_text()
    assert "| dlrmc (this artifact) |" in table and "| PyTorch eager |" in table
    assert "| dlrmc, compiled call only |" in table and "time `predict`" in table
    assert "lower bound" in table
    layers = data["layers"]
    assert layers["fma_peak_flops"] > 1e9 and layers["batch"] == 8
    assert "| bot 13->32 |" in layers["table"] and "| top 32->1 |" in layers["table"]
    assert "FMA peak (built-in probe" in res.stdout
