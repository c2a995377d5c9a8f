"""Batch buckets, the dlrmc_work schedule, dlrm-tune's logs and their replay, RPC tuning."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tvm
from tvm import s_tir

from dlrmc.frontend.arch import Arch
from dlrmc.runtime.plan import MAX_PADDING, pick, slice_batch
from dlrmc.frontend import ops as ref
from dlrmc.schedules import work_rule
from dlrmc.schedules.kernels import make

from conftest import make_batch, run, torch_predict

TARGET = tvm.target.Target({"kind": "llvm"})
TINY = Arch(4, (100, 50, 20, 10), (13, 32, 4), (32, 1))


@pytest.mark.parametrize("buckets", [(), (1,), (4, 16), (1, 64, 512, 2048), (3, 5, 7)])
def test_pick_covers_the_batch_and_bounds_padding(buckets):
    for batch in range(1, 5000, 37):
        plan = pick(batch, buckets)
        assert sum(rows for rows, _ in plan) == batch
        for rows, entry in plan:
            assert entry == 0 or entry in buckets
            assert entry == 0 or rows <= entry and entry - rows <= MAX_PADDING * entry
        if buckets and batch in buckets:
            assert plan == [(batch, batch)]
        if buckets:
            assert all(entry == max(buckets) for _, entry in plan[:-1])


def test_compile_model_refuses_buckets_a_loader_would_refuse(tmp_path):
    from dlrmc.compiler.build import compile_model
    from dlrmc.frontend.model import DLRM
    for buckets in [(4, 70000), (0,), (-3, 8)]:
        with pytest.raises(ValueError, match="batch buckets must be 1 to 65536"):
            compile_model(DLRM(TINY).eval(), TINY, "llvm", str(tmp_path / "a"),
                          log=lambda _: None, buckets=buckets)
        assert not (tmp_path / "a").exists()


def test_slice_batch_pads_with_empty_bags():
    from dlrmc.frontend.ops import flat_layout, reference_layout
    rng = np.random.default_rng(0)
    dense, offsets, indices = make_batch(TINY, 9, rng, max_bag=4)
    d, flat_i, flat_o = slice_batch(dense, *flat_layout(offsets, indices), 3, 5, 8)
    np.testing.assert_array_equal(d[:5], dense[3:8])
    assert not d[5:].any()
    assert flat_o[0] == 0 and flat_o[-1] == len(flat_i) and (np.diff(flat_o) >= 0).all()
    o, i = reference_layout(flat_i, flat_o, TINY.num_tables)
    for t in range(TINY.num_tables):
        lo, hi = offsets[t, 3], offsets[t, 8]
        np.testing.assert_array_equal(i[t], indices[t][lo:hi])
        np.testing.assert_array_equal(o[t, :5], offsets[t, 3:8] - lo)
        assert (o[t, 5:] == hi - lo).all()          # padding bags: empty, at the end


def _run_kernel(func, arrays):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return [a.numpy() for a in args]


def _packed(w: np.ndarray, nr: int = 32) -> np.ndarray:
    """W [N, K] as the dense kernel's panels [ceil(N/NR), K, NR], zero past N (numpy)."""
    n, k = w.shape
    padded = np.zeros((-(-n // nr) * nr, k), np.float32)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(-1, nr, k).transpose(0, 2, 1))


def _each_grain(func):
    """``func`` scheduled with every grain the rule can sample (a few per loop)."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    blocks = work_rule.annotated_blocks(sch)
    assert blocks, "a static kernel with enough work has a tunable work loop"
    extent = int(sch.get(sch.get_loops(blocks[0])[-1]).extent)
    for grain in work_rule.grains(extent)[::2] + [extent]:
        s = s_tir.Schedule(tvm.IRModule({"main": func}))
        for b in work_rule.annotated_blocks(s):
            work_rule.apply(s, b, min(grain, int(s.get(s.get_loops(b)[-1]).extent)))
        yield grain, s.mod["main"]


@pytest.mark.parametrize("batch,prefetch", [(300, 0), (1000, 16), (257, 4)])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False),
                                           ("max", False)])
def test_static_embedding_bags_every_grain(batch, prefetch, mode, weighted):
    rng = np.random.default_rng(batch)
    rows, dim = (30, 20, 10), 16
    func = make("embedding_bags", dim=dim, mode=mode, weighted=weighted, index_dtype="int64",
                include_last_offset=False, padding_idx=None, offset_rows=[0, 1, 2], batch=batch,
                prefetch=prefetch)
    sizes = rng.integers(0, 4, (3, batch))
    offsets = np.stack([np.concatenate([[0], np.cumsum(s)[:-1]]) for s in sizes])
    idx = [rng.integers(0, r, s.sum()) for r, s in zip(rows, sizes)]
    tables = [rng.standard_normal((r, dim)).astype(np.float32) for r in rows]
    psw = [rng.standard_normal(len(i)).astype(np.float32) for i in idx] if weighted else []
    expect = [ref.embedding_bag(w, i, o, mode, p if weighted else None)
              for w, i, o, p in zip(tables, idx, offsets, psw or [None] * 3)]
    for grain, scheduled in _each_grain(func):
        outs = [np.full((batch, dim), np.nan, np.float32) for _ in rows]
        got = _run_kernel(scheduled, tables + idx + [offsets] + psw + outs)[-3:]
        for g, e in zip(got, expect):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"grain {grain}")


@pytest.mark.parametrize("batch", [64, 333])
def test_static_interaction_and_dense_every_grain(batch):
    rng = np.random.default_rng(batch)
    feats = [rng.standard_normal((batch, 16)).astype(np.float32) for _ in range(5)]
    func = make("dot_interaction", num_features=5, dim=16, self_interaction=False,
                prepend_dense=True, lanes=16, stacked=False, batch=batch)
    expect = ref.dot_interaction(np.stack(feats, 1), False, True)
    for grain, scheduled in _each_grain(func):
        out = np.full(expect.shape, np.nan, np.float32)
        got = _run_kernel(scheduled, feats + [out])[-1]
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5, err_msg=f"grain {grain}")
    n, k = 70, 45
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    packed = _packed(w)
    for mr in (4, 6, 8, 12):           # every micro-tile height AVX-512 registers allow
        func = make("dense", n=n, k=k, act="relu", mr=mr, nr=32, parallel_min_macs=0, batch=batch)
        for grain, scheduled in _each_grain(func):
            out = np.full((batch, n), np.nan, np.float32)
            got = _run_kernel(scheduled, [x, packed, b, out])[-1]
            np.testing.assert_allclose(got, ref.dense(x, w, b, "relu"), rtol=1e-4, atol=1e-4,
                                       err_msg=f"MR {mr}, grain {grain}")


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_static_dense_under_one_tile_splits_large_weights_over_the_cores(batch):
    """A bucket smaller than one micro-tile streams the whole weight for each row: with the
    weights at ``parallel_min_bytes`` or more its rows' panels become the rule's work items
    (right at every grain); below it, and without the knob, they run serially, as they did."""
    rng = np.random.default_rng(batch)
    n, k, mr = 70, 45, 6
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    packed = _packed(w)
    weight_bytes = packed.nbytes
    args = dict(n=n, k=k, act="relu", mr=mr, nr=32, parallel_min_macs=1 << 40, batch=batch)
    for min_bytes in (0, weight_bytes + 1):
        func = make("dense", **args, parallel_min_bytes=min_bytes)
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        assert not work_rule.annotated_blocks(sch), min_bytes
    func = make("dense", **args, parallel_min_bytes=weight_bytes)
    for grain, scheduled in _each_grain(func):
        out = np.full((batch, n), np.nan, np.float32)
        got = _run_kernel(scheduled, [x, packed, b, out])[-1]
        np.testing.assert_allclose(got, ref.dense(x, w, b, "relu"), rtol=1e-4, atol=1e-4,
                                   err_msg=f"grain {grain}")


# --- dlrm-tune, logs and replay -----------------------------------------------------------

TUNE_MODEL = ["--arch-sparse-feature-size", "4", "--arch-embedding-size", "100-50-20-10",
              "--arch-mlp-bot", "13-32-4", "--arch-mlp-top", "32-1"]


@pytest.fixture(scope="module")
def tuned_log(tmp_path_factory):
    log = tmp_path_factory.mktemp("tune") / "log"
    res = run("dlrm-tune", *TUNE_MODEL, "--buckets", "64,512", "--trials", "8", "-o", str(log))
    return log, res


def test_tune_states_its_plan_and_its_bar_keeps_its_total(tuned_log):
    """8 trials over more tasks are one round each: the plan says so, the bar's total is that
    from the start, and the target reads as it was given, not as a dict."""
    _, res = tuned_log
    plan = re.search(r"^(\d+) tasks at buckets 64,512, 1 trials each \((\d+) in all\); "
                     r"target llvm -mcpu=\S+ -num-cores=\d+$", res.stdout, re.M)
    assert plan and plan.group(1) == plan.group(2), res.stdout
    totals = set(re.findall(r"\d+/(\d+) \[", res.stderr))
    assert totals == {plan.group(2)}, totals


def _records(log) -> int:
    return len((log / "database_tuning_record.json").read_text().splitlines())


def test_tune_writes_a_log_with_every_task(tuned_log):
    log, res = tuned_log
    manifest = json.loads((log / "dlrmc_tuning.json").read_text())
    names = [t["name"] for t in manifest["tasks"]]
    assert {"embedding_bags_4_b64", "embedding_bags_4_b512", "dot_interaction_b512"} <= set(names)
    assert manifest["buckets"] == [64, 512] and manifest["indices_per_bag"] == 1
    assert all(t["trials"] >= 1 and t["best_s"] and t["best_s"] < 1 for t in manifest["tasks"])
    assert _records(log) >= len(names)
    for name in names:
        assert name in res.stdout                          # the per-task summary


def test_every_kernel_default_is_measured_and_the_replay_never_picks_slower(tuned_log):
    """Each kernel's default schedule is in the log as a record that replays to exactly what
    the build does without a log, measured in the same run as the candidates; so the kernel's
    best record, what the replay takes, is at most the default's time, and the table prints
    the default and the gain."""
    from tvm.s_tir import meta_schedule as ms

    from dlrmc.schedules.tuning.log import is_default, records
    from dlrmc.schedules.tuning.tasks import extract_tasks
    from dlrmc.compiler.build import prepare
    from dlrmc.frontend.model import DLRM

    log, res = tuned_log
    manifest = json.loads((log / "dlrmc_tuning.json").read_text())
    defaults = {t["name"]: t for t in manifest["tasks"] if "[" not in t["name"]}
    assert defaults and all(t["default_s"] for t in defaults.values())
    for name, t in defaults.items():
        variants = [v["best_s"] for v in manifest["tasks"] if v["name"].split("[")[0] == name]
        assert min(variants) <= t["best_s"] <= t["default_s"]
        row = next(line for line in res.stdout.splitlines() if line.startswith(name + " "))
        gain = t["default_s"] / min(variants)
        assert row.endswith(f"{t['default_s'] * 1e6:.1f} us  {gain:.2f}x"), row
    db = ms.database.JSONDatabase(work_dir=str(log), allow_missing=False)
    from dlrmc.targets import parse_target

    host = parse_target("host")      # what dlrm-tune tuned for
    tasks = extract_tasks(prepare(DLRM(TINY, seed=0).eval(), TINY, host, (64, 512)).mod, host, 1)
    for task in (t for t in tasks if t.name in defaults):
        found = [r for r in records(db, task) if is_default(r)]
        assert len(found) == 1, task.name
        sch = s_tir.Schedule(task.mod)
        found[0].trace.apply_to_schedule(sch, remove_postproc=True)
        tvm.ir.assert_structural_equal(sch.mod["main"], work_rule.apply_default(task.mod["main"]))


@pytest.mark.slow
def test_tune_resumes_without_remeasuring(tuned_log, tmp_path):
    log, _ = tuned_log
    before = (log / "database_tuning_record.json").read_bytes()
    res = run("dlrm-tune", *TUNE_MODEL, "--buckets", "64,512", "--trials", "8",
              "--no-progress", "-o", str(log))
    assert (log / "database_tuning_record.json").read_bytes() == before
    assert "wrote" in res.stdout
    other = run("dlrm-tune", *TUNE_MODEL, "--buckets", "64", "--trials", "8", "--no-progress",
                "-o", str(log), check=False)
    assert other.returncode == 2 and "another buckets" in other.stderr


def test_log_replays_in_a_fresh_process_with_no_tuning(tuned_log, tmp_path):
    log, _ = tuned_log
    before = (log / "database_tuning_record.json").read_bytes()
    out = tmp_path / "tuned"
    t0 = time.time()
    res = run("dlrm-compile", *TUNE_MODEL, "--tuning-log", str(log), "-o", str(out),
              "--check", "600")
    assert time.time() - t0 < 60
    assert "max |dlrmc - PyTorch| over batch 600" in res.stdout
    assert "warning" not in res.stdout
    assert (log / "database_tuning_record.json").read_bytes() == before   # nothing measured
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == {"64": "main_b64", "512": "main_b512"}
    assert set(manifest["tuning_log"]["tuned"]) >= {"embedding_bags_4_b512",
                                                    "dot_interaction_b512"}
    assert manifest["tuning_log"]["default"] == []
    # the tuned artifact equals the default one and PyTorch, at and between the buckets
    from dlrmc.frontend.model import DLRM
    from dlrmc.runtime import load

    model = DLRM(Arch(4, (100, 50, 20, 10), (13, 32, 4), (32, 1)), seed=0).eval()
    runtime = load(str(out))
    rng = np.random.default_rng(1)
    for batch in (1, 50, 64, 500, 512, 1200):
        dense, offsets, indices = make_batch(model.arch, batch, rng, max_bag=5)
        np.testing.assert_allclose(runtime.predict(dense, offsets, indices),
                                   torch_predict(model, dense, offsets, indices),
                                   rtol=1e-5, atol=2e-6, err_msg=f"batch {batch}")


def test_mismatched_logs_get_clear_messages(tuned_log, tmp_path):
    log, _ = tuned_log
    other_target = run("dlrm-compile", *TUNE_MODEL, "--target", "llvm -mcpu=haswell",
                       "--tuning-log", str(log), "-o", str(tmp_path / "a"), check=False)
    assert other_target.returncode == 2
    assert "was made for another target" in other_target.stderr
    assert not (tmp_path / "a").exists()
    other_model = ["--arch-sparse-feature-size", "4", "--arch-embedding-size", "100-50-20-30",
                   "--arch-mlp-bot", "13-32-4", "--arch-mlp-top", "32-1"]
    res = run("dlrm-compile", *other_model, "--tuning-log", str(log), "-o", str(tmp_path / "b"))
    assert "another model architecture" in res.stdout
    assert "no record for 2 task(s)" in res.stdout
    assert "embedding_bags_4_b64" in res.stdout and "embedding_bags_4_b512" in res.stdout
    for name, setup, message in [
            ("missing", lambda d: None, "does not exist"),
            ("empty", lambda d: d.mkdir(), "is not a dlrmc tuning log"),
            ("corrupt", lambda d: (d.mkdir(), (d / "dlrmc_tuning.json").write_text("{oops")),
             "is corrupt"),
            ("deep", lambda d: (d.mkdir(), (d / "dlrmc_tuning.json").write_text(
                "[" * 100000 + "]" * 100000)), "is corrupt: maximum recursion depth"),
            ("list", lambda d: (d.mkdir(), (d / "dlrmc_tuning.json").write_text("[1]")),
             "is corrupt: not a JSON object"),
            ("no-db", lambda d: (d.mkdir(), (d / "dlrmc_tuning.json").write_text(
                (log / "dlrmc_tuning.json").read_text())), "lacks MetaSchedule's")]:
        bad = tmp_path / name
        setup(bad)
        res = run("dlrm-compile", *TUNE_MODEL, "--tuning-log", str(bad), "-o",
                  str(tmp_path / f"out-{name}"), check=False)
        assert res.returncode == 2 and message in res.stderr, (name, res.stderr)
        assert "Traceback" not in res.stderr


def test_tune_rejects_bad_flags(tmp_path):
    for args, message in [([], "give --trials"), (["--trials", "0"], "must be positive"),
                          (["--trials", "2", "--rpc-tracker", "h:1"], "go together"),
                          (["--trials", "2", "--buckets", "0"], "must be 1 to 65536"),
                          (["--trials", "2", "--buckets", "4,70000"], "must be 1 to 65536"),
                          (["--trials", "2", "--buckets", "1"], "nothing to tune"),
                          (["--trials", "2", "--target", "cuda -arch=sm_90"],
                           "dlrm-tune tunes CPU targets")]:
        res = run("dlrm-tune", *TUNE_MODEL, *args, "-o", str(tmp_path / "x"), check=False)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("mine")
    res = run("dlrm-tune", *TUNE_MODEL, "--trials", "2", "-o", str(tmp_path / "notes.txt"),
              check=False)
    assert res.returncode == 2 and "notes.txt is a file; the tuning log is a directory" in res.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- RPC ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.slow
def test_tuning_through_an_rpc_tracker_and_server(tmp_path):
    tracker_port, server_port = _free_port(), _free_port()
    env = dict(os.environ, TVM_NUM_THREADS="2")
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                               "127.0.0.1", "--port", str(tracker_port), "--port-end",
                               str(tracker_port + 1)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for(tracker_port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker",
             f"127.0.0.1:{tracker_port}", "--key", "dlrmc-test", "--host", "127.0.0.1",
             "--port", str(server_port), "--port-end", str(server_port + 1)], env=env,
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(server_port)
        log = tmp_path / "rpc"
        res = run("dlrm-tune", *TUNE_MODEL, "--buckets", "512", "--trials", "2",
                  "--no-progress", "--rpc-tracker", f"127.0.0.1:{tracker_port}",
                  "--rpc-key", "dlrmc-test", "-o", str(log), timeout=300)
        manifest = json.loads((log / "dlrmc_tuning.json").read_text())
        measured = [t for t in manifest["tasks"] if t["best_s"] is not None]
        assert measured, res.stdout
    finally:
        for p in procs:    # the server's session workers too: each runs in its own group
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)


def test_bench_with_a_tuning_log(tuned_log, tmp_path):
    log, _ = tuned_log
    out, curve = tmp_path / "b.json", tmp_path / "curve.png"
    res = run("dlrm-bench", *TUNE_MODEL, "--tuning-log", str(log), "--peers", "none",
              "--batches", "1,64", "--repeat", "3", "--json", str(out), "--curve", str(curve),
              timeout=600)
    data = json.loads(out.read_text())
    for r in data["results"]:
        assert set(r["systems"]) == {"dlrmc", "dlrmc-call", "dlrmc-default"}
        assert r["max_abs_diff_vs_eager"] < 1e-5
    tasks = data["tuning"]["tasks"]
    assert tasks and all(t["name"] in res.stdout for t in tasks)
    assert "GB/s" in res.stdout and "GFLOP/s" in res.stdout
    assert data["tuning"]["curve"]["trials"] and curve.read_bytes()[:4] == b"\x89PNG"
    assert "| dlrmc, default schedules |" in res.stdout


def test_variants_fit_the_target_registers():
    from dlrmc.schedules.kernels import variants
    from dlrmc.targets import parse_target
    from dlrmc.targets.knobs import cpu_knobs

    dense = {"kernel": "dense", "args": {"mr": 6, "nr": 32}}
    avx512 = cpu_knobs(parse_target("llvm -mcpu=skylake-avx512"))
    assert variants(dense, avx512) == [{"mr": 4}, {}, {"mr": 8}, {"mr": 12}]
    avx2 = cpu_knobs(parse_target("llvm -mcpu=haswell"))
    assert variants({"kernel": "dense", "args": {"mr": 6, "nr": 16}}, avx2) == [{"mr": 4}, {}]
    bags = {"kernel": "embedding_bags", "args": {"prefetch": 0}}
    assert {} in variants(bags, avx2) and {"prefetch": 16} in variants(bags, avx2)
    assert variants({"kernel": "concat_rows", "args": {}}, avx2) == [{}]


def test_bucket_dense_kernels_take_a_tile_height_that_divides_the_batch():
    """Where the default MR leaves rows over and a taller tile the registers hold divides the
    bucket, the bucket's fp32 dense kernels take it (AVX-512: 8 for 64, 512 and 2048); the
    any-batch entry and AVX2 (no taller tile fits 16 registers) keep the default."""
    from dlrmc.compiler.build import prepare
    from dlrmc.frontend.model import DLRM
    from dlrmc.schedules.kernels import recipe
    from dlrmc.targets import parse_target
    from dlrmc.targets.knobs import cpu_knobs

    avx512 = cpu_knobs(parse_target("llvm -mcpu=skylake-avx512"))
    avx2 = cpu_knobs(parse_target("llvm -mcpu=haswell"))
    batches = (1, 4, 16, 24, 36, 48, 64, 100, 512, 2048)
    assert [avx512.mr_for_batch(32, b, 6) for b in batches] == [6, 6, 8, 6, 6, 6, 8, 6, 8, 8]
    assert [avx512.mr_for_batch(16, b, 6) for b in (64, 36)] == [8, 6]
    assert avx512.mr_for_batch(32, 6, 4) == 6       # a shorter default: the next that divides
    assert {avx2.mr_for_batch(16, b, 6) for b in batches} == {6}
    lowered = prepare(DLRM(TINY, seed=0).eval(), TINY, parse_target("llvm -mcpu=skylake-avx512"),
                      (48, 64), log=lambda _: None)
    heights = {}
    for _, func in lowered.mod.functions.items():
        r = recipe(func)
        if r and r["kernel"] == "dense":
            heights.setdefault(r["args"]["batch"], set()).add(r["args"]["mr"])
    assert heights == {None: {6}, 48: {6}, 64: {8}}


@pytest.mark.slow
def test_time_budget_stops_tuning_and_resumes_the_least_measured(tmp_path):
    log = tmp_path / "budget"
    args = ["dlrm-tune", *TUNE_MODEL, "--buckets", "512", "--trials", "400",
            "--time-budget", "0.001", "--no-progress", "-o", str(log)]
    run(*args)
    first = json.loads((log / "dlrmc_tuning.json").read_text())["tasks"]
    measured = [t["name"] for t in first if t["trials"]]
    assert 0 < len(measured) < len(first)              # stopped after the first batch
    run(*args)
    second = json.loads((log / "dlrmc_tuning.json").read_text())["tasks"]
    newly = [t["name"] for t, old in zip(second, first) if t["trials"] > old["trials"]]
    assert newly and not set(newly) & set(measured)    # the unmeasured tasks went first


@pytest.mark.parametrize("quant,dim", [("int8", 24), ("int4", 24), ("int4", 9)])
@pytest.mark.parametrize("mode,weighted,prefetch", [("sum", False, 0), ("sum", True, 16),
                                                    ("mean", False, 4), ("max", False, 0)])
def test_rowwise_quantised_tables_match_the_dequantised_oracle(quant, dim, mode, weighted,
                                                                prefetch):
    from dlrmc.schedules.embedding_bag import dequantize_rows, fused_width, quantize_rows

    rng = np.random.default_rng(5)
    rows, batch = (40, 7, 300), 200
    levels = 255 if quant == "int8" else 15
    tables = [rng.standard_normal((r, dim)).astype(np.float32) * 3 for r in rows]
    tables[1][3] = 0.5                                          # a constant row: scale 0
    fused = [quantize_rows(t, quant, chunk=16) for t in tables]
    for t, f in zip(tables, fused):
        assert f.dtype == np.uint8 and f.shape == (t.shape[0], fused_width(dim, quant))
        scale = (t.max(1) - t.min(1)) / levels
        assert (np.abs(dequantize_rows(f, dim, quant) - t) <= scale[:, None] / 2 + 1e-5).all()
    func = make("embedding_bags", dim=dim, mode=mode, weighted=weighted, index_dtype="int64",
                include_last_offset=False, padding_idx=None, offset_rows=[0, 1, 2],
                batch=batch, prefetch=prefetch, quant=quant)
    sizes = rng.integers(0, 5, (3, batch))
    offsets = np.stack([np.concatenate([[0], np.cumsum(s)[:-1]]) for s in sizes])
    idx = [rng.integers(0, r, s.sum()) for r, s in zip(rows, sizes)]
    psw = [rng.standard_normal(len(i)).astype(np.float32) for i in idx] if weighted else []
    for grain, scheduled in _each_grain(func):
        outs = [np.full((batch, dim), np.nan, np.float32) for _ in rows]
        got = _run_kernel(scheduled, fused + idx + [offsets] + psw + outs)[-3:]
        for k in range(3):
            expect = ref.embedding_bag(dequantize_rows(fused[k], dim, quant), idx[k], offsets[k],
                                       mode,
                                       psw[k] if weighted else None)
            np.testing.assert_allclose(got[k], expect, rtol=1e-5, atol=1e-5,
                                       err_msg=f"grain {grain}")


@pytest.mark.parametrize("quant,row_bytes,tolerance", [("int8", 16 + 8, 2e-2),
                                                      ("int4", 8 + 8, 1e-1)])
def test_quantised_tables_end_to_end(tmp_path, quant, row_bytes, tolerance):
    from dlrmc.compiler.build import compile_model
    from dlrmc.frontend.model import DLRM
    from dlrmc.runtime import load
    from dlrmc.schedules.embedding_bag import dequantize_rows

    arch = Arch(16, (300, 50, 7, 120), (13, 32, 16), (32, 1))
    model = DLRM(arch, seed=2).eval()
    compile_model(model, arch, "llvm", str(tmp_path / "f"), log=lambda _: None, buckets=(8,))
    compile_model(model, arch, "llvm", str(tmp_path / "q"), log=lambda _: None, buckets=(8,),
                  emb_quant=quant)
    fp32, q = load(str(tmp_path / "f")), load(str(tmp_path / "q"))
    assert q.manifest.emb_quant == quant
    tables = [t for t in q.manifest.weights["tensors"] if t["name"].startswith("emb_l")]
    assert all(t["dtype"] == "uint8" and t["shape"][1] == row_bytes for t in tables)
    size = lambda d: (tmp_path / d / "weights.bin").stat().st_size  # noqa: E731
    saved = sum(arch.embedding_sizes) * (16 * 4 - row_bytes)     # 64 -> 24 or 16 bytes a row
    assert size("f") - size("q") >= saved - 64 * len(tables)       # (64-byte alignment)
    # PyTorch with the dequantised tables computes what the int8 artifact computes
    from dlrmc.artifact import read_weights

    deq = DLRM(arch, seed=2).eval()
    names = [t["name"] for t in q.manifest.weights["tensors"]]
    for name, w in zip(names, read_weights(str(tmp_path / "q"), q.manifest)):
        if w.dtype == np.uint8:
            deq.state_dict()[name].copy_(torch.from_numpy(dequantize_rows(w, 16, quant)))
    rng = np.random.default_rng(0)
    for batch in (1, 8, 7, 50):
        dense, offsets, indices = make_batch(arch, batch, rng, max_bag=4)
        ours = q.predict(dense, offsets, indices)
        np.testing.assert_allclose(ours, torch_predict(deq, dense, offsets, indices),
                                   rtol=1e-5, atol=2e-6)
        assert np.abs(ours - fp32.predict(dense, offsets, indices)).max() < tolerance


def test_compile_cli_with_int8_tables(tmp_path):
    res = run("dlrm-compile", *TUNE_MODEL, "--emb-quant", "int8", "--buckets", "none",
              "-o", str(tmp_path / "q"), "--check", "20")
    assert "max |dlrmc - PyTorch| over batch 20" in res.stdout
    bad = run("dlrm-compile", *TUNE_MODEL, "--emb-quant", "int3", "-o", str(tmp_path / "x"),
              check=False)
    assert bad.returncode == 2 and "--emb-quant" in bad.stderr


def test_arm_targets_get_neon_knobs_and_tuning_spaces():
    """An aarch64 model's kernels take the NEON knobs and MetaSchedule builds their design
    spaces with our rule under the arm_cpu target key (measuring needs an ARM machine, e.g.
    through --rpc-tracker)."""
    from tvm.s_tir import meta_schedule as ms

    from dlrmc.compiler.build import prepare
    from dlrmc.frontend.model import DLRM
    from dlrmc.schedules.tuning.measure import skip_tensor_intrinsics
    from dlrmc.schedules.tuning.tasks import extract_tasks
    from dlrmc.targets import parse_target
    from dlrmc.targets.knobs import cpu_knobs

    target = parse_target("llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1 -mattr=+neon")
    assert "arm_cpu" in [str(k) for k in target.keys]
    knobs = cpu_knobs(target)
    assert (knobs.lanes, knobs.nr, knobs.name) == (4, 16, "neon")
    arch = Arch(8, (50, 40), (13, 256, 8), (16, 1))
    lowered = prepare(DLRM(arch), arch, target, (512,), log=lambda _: None)
    tasks = extract_tasks(lowered.mod, target)
    assert {t.kind for t in tasks} >= {"embedding_bags", "dense"}
    assert any(t.kind == "dense" and t.override == {"mr": 4} for t in tasks)
    skip_tensor_intrinsics()
    for task in tasks:
        ctx = ms.TuneContext(mod=task.mod, target=target, task_name=task.name, num_threads=1,
                             space_generator=ms.space_generator.PostOrderApply(
                                 sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[],
                                 mutator_probs={}))
        spaces = ctx.generate_design_space()
        assert spaces, task.name
        insts = [str(i.kind.name) for i in spaces[0].trace.insts]
        assert "SampleCategorical" in insts, (task.name, insts)
