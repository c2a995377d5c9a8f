"""dlrm-train on synthetic Criteo data, its reference-format checkpoint, and dlrm-eval."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from dlrmc.bench.eval_cli import metrics
from dlrmc.frontend.checkpoint import load_model
from dlrmc.frontend.criteo import preprocess
from dlrmc.frontend.synth import generate

from conftest import run

ARCH = ["--arch-sparse-feature-size", "8", "--arch-mlp-bot", "13-32-8", "--arch-mlp-top", "32-1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    generate(str(d / "s.txt"), 30000, seed=7, max_vocab=1000)
    preprocess(str(d / "s.txt"), str(d / "s.npz"))
    res = run("dlrm-train", "--data", str(d / "s.npz"), *ARCH, "--optimizer", "adagrad",
              "--learning-rate", "0.05", "--mini-batch-size", "128", "--nepochs", "1",
              "--print-freq", "50", "--save-model", str(d / "m.pt"), "--threads", "2")
    return d, res


def test_train_prints_the_reference_lines_and_saves_its_checkpoint(trained):
    d, res = trained
    lines = res.stdout.splitlines()
    assert any(re.fullmatch(r"Finished training it \d+/\d+ of epoch 0, [\d.]+ ms/it, "
                            r"loss [\d.]+", ln) for ln in lines), res.stdout
    assert any(re.fullmatch(r"Testing at - \d+/\d+ of epoch 0,", ln) for ln in lines)
    assert re.search(r"epoch 0: +\d+%\|.*\| \d+/\d+ \[", res.stderr)     # the progress bar
    assert any(re.fullmatch(r" loss [\d.]+, accuracy [\d.]+ %, best [\d.]+ %", ln)
               for ln in lines)
    ckpt = torch.load(d / "m.pt", weights_only=True)
    assert {"epoch", "nepochs", "iter", "state_dict", "train_acc", "test_acc",
            "opt_state_dict"} <= set(ckpt)
    assert "emb_l.0.weight" in ckpt["state_dict"] and "bot_l.0.weight" in ckpt["state_dict"]
    model = load_model(str(d / "m.pt"))          # our loader, as for reference checkpoints
    assert model.arch.sparse_feature_size == 8 and len(model.arch.embedding_sizes) == 26


def test_compiled_artifact_evaluates_like_pytorch(trained):
    d, _ = trained
    run("dlrm-compile", "--load-model", str(d / "m.pt"), "--buckets", "64", "-o",
        str(d / "m.dlrmc"))
    res = run("dlrm-eval", str(d / "m.dlrmc"), "--data", str(d / "s.npz"), "--split", "test",
              "--batch-size", "1000")
    rows = {ln.split()[0]: ln.split()[1:] for ln in res.stdout.splitlines()
            if ln.startswith(("dlrmc", "pytorch"))}
    auc_ours, auc_ref = float(rows["dlrmc"][0]), float(rows["pytorch"][0])
    assert abs(auc_ours - auc_ref) <= 1e-6
    assert auc_ours > 0.6, res.stdout          # it learned something
    assert float(res.stdout.split("prediction:")[1]) < 1e-5
    assert "constant" not in res.stderr
    bad = run("dlrm-eval", str(d / "m.dlrmc"), "--data", str(d / "s.txt"), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_eval_warns_when_predictions_are_constant(trained, capsys):
    from dlrmc.bench import eval_cli
    from dlrmc.compiler.build import compile_model

    d, _ = trained
    model = load_model(str(d / "m.pt"))
    last = max(k for k, _ in model.named_parameters() if k.startswith("top_l.") and
               k.endswith(".weight"))
    model.get_parameter(last).data.zero_()   # the output no longer depends on the input
    compile_model(model, model.arch, None, str(d / "const.dlrmc"), log=lambda _: None,
                  buckets=(64,))
    assert eval_cli.main([str(d / "const.dlrmc"), "--data", str(d / "s.npz"), "--split", "test",
                          "--batch-size", "1000"]) == 0
    assert "warning: the artifact's predictions are constant" in capsys.readouterr().err


@pytest.fixture(scope="module")
def kaggle_sized(tmp_path_factory):
    """The documented recipe's data (docs/numerics.md): 20,000 synthetic rows, the default (Kaggle) MLPs."""
    d = tmp_path_factory.mktemp("recipe")
    run("dlrm-data", "synth", "-o", str(d / "synth.txt"), "--rows", "20000", "--seed", "0")
    run("dlrm-data", "criteo", str(d / "synth.txt"), "-o", str(d / "synth.npz"))
    return d


def test_a_diverging_run_stops_without_a_checkpoint(kaggle_sized):
    d = kaggle_sized
    res = run("dlrm-train", "--data", str(d / "synth.npz"), "--optimizer", "adagrad",
              "--learning-rate", "0.05", "--save-model", str(d / "bad.pt"), "--threads", "2",
              check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "training diverged" in res.stderr and "lower --learning-rate" in res.stderr
    assert "no checkpoint written" in res.stderr and not (d / "bad.pt").exists()


def test_the_documented_recipe_learns(kaggle_sized):
    """The training recipe of docs/numerics.md, as written there."""
    d = kaggle_sized
    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "numerics.md")).read()
    recipe = next(ln for ln in readme.splitlines() if ln.startswith("dlrm-train --data synth.npz"))
    args = recipe.split("#")[0].split()[1:]
    args = [str(d / a) if a in ("synth.npz", "m.pt") else a for a in args]
    res = run("dlrm-train", *args, "--threads", "2")
    auc = float(re.search(r"^ auc ([\d.]+)$", res.stdout, re.M).group(1))
    assert auc > 0.65, res.stdout
    assert (d / "m.pt").is_file()


def _auc_by_ranks(y, p):
    """The Mann-Whitney form of AUC, written independently of scikit-learn."""
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    i = 0
    while i < len(p):                       # average ranks over ties
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


@pytest.mark.parametrize("seed", range(4))
def test_metrics_agree_with_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(500) < 0.3).astype(np.float32)
    p = np.clip(rng.random(500) * 0.6 + y * 0.3, 0, 1).astype(np.float32)
    p[:50] = np.round(p[:50], 1)            # ties
    m = metrics(y, p)
    assert m["auc"] == pytest.approx(_auc_by_ranks(y, p.astype(np.float64)), abs=1e-12)
    pc = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    assert m["log_loss"] == pytest.approx(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    assert m["accuracy"] == pytest.approx(np.mean((p > 0.5) == (y == 1)))


@pytest.mark.slow   # (~40 s; each variant's accuracy is checked by the reduced-precision test)
def test_eval_compare_variants(trained):
    d, _ = trained
    # bf16 and fp16 are checked by the variant test below, int8 tables in test_tuning
    names = ("fp32", "int4-emb", "int8-mlp")
    res = run("dlrm-eval", "--compare", ",".join(names), "--load-model", str(d / "m.pt"),
              "--data", str(d / "s.npz"), "--batch-size", "2000")
    rows = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if ln.startswith(names)}
    assert set(rows) == set(names)
    assert float(rows["fp32"][2]) == 0.0
    delta = {k: abs(float(v[2])) for k, v in rows.items()}
    assert delta["int4-emb"] < 0.03 and delta["int8-mlp"] < 0.005, res.stdout
    sizes = {k: float(v[-2]) for k, v in rows.items()}
    assert sizes["int4-emb"] < sizes["fp32"] == sizes["int8-mlp"]
    assert "int8-mlp: compiling" in res.stderr          # its progress bar names the step
    assert all(float(v[5]) > 0 for v in rows.values())           # ms per batch of 512
    for args, message in [(["--compare", "fp8", "--load-model", str(d / "m.pt")],
                           "unknown variant"),
                          (["--compare", "fp32"], "--load-model")]:
        bad = run("dlrm-eval", *args, "--data", str(d / "s.npz"), check=False)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


@pytest.mark.parametrize("options,tolerance", [(["--precision", "bf16"], 0.02),
                                               (["--precision", "fp16"], 0.005),
                                               (["--mlp-quant", "int8"], 0.05)])
def test_reduced_precision_artifacts_stay_near_fp32(trained, options, tolerance):
    """Each variant of the trained model against PyTorch's fp32 predictions on real rows,
    at a bucket batch (64) and at the any-batch entry (37)."""
    from dlrmc.frontend.dataset import ProcessedData
    from dlrmc.runtime import load

    d, _ = trained
    out = d / ("m-" + "-".join(options).replace("--", ""))
    run("dlrm-compile", "--load-model", str(d / "m.pt"), "--buckets", "64", "-o", str(out),
        "--calibration-data", str(d / "s.npz"), *options)
    compiled, model = load(str(out)), load_model(str(d / "m.pt")).eval()
    assert compiled.manifest.precision == options[1] or compiled.manifest.mlp_quant == "int8"
    data = ProcessedData.load(str(d / "s.npz"))
    worst = 0.0
    for batch in (64, 37):
        dense, offsets, indices, _ = next(data.batches("test", batch))
        ours = compiled.predict(dense, offsets, indices)
        with torch.no_grad():
            want = model(torch.from_numpy(dense), torch.from_numpy(offsets),
                         [torch.from_numpy(i) for i in indices]).numpy()
        worst = max(worst, float(np.abs(ours - want).max()))
    assert 0 < worst < tolerance


def test_a_dcn_model_trains_and_its_artifact_evaluates_as_pytorch(kaggle_sized):
    """The DLRM_DCN interaction (logits out) through dlrm-train, dlrm-compile and dlrm-eval:
    it learns, and the artifact's AUC is PyTorch's."""
    d = kaggle_sized
    res = run("dlrm-train", "--data", str(d / "synth.npz"), "--optimizer", "adagrad",
              "--learning-rate", "0.01", "--arch-interaction-op", "dcn", "--dcn-layers", "2",
              "--dcn-low-rank", "16", "--save-model", str(d / "dcn.pt"), "--threads", "2",
              "--no-progress")
    auc = float(re.search(r"^ auc ([\d.]+)$", res.stdout, re.M).group(1))
    assert auc > 0.65, res.stdout
    run("dlrm-compile", "--load-model", str(d / "dcn.pt"), "-o", str(d / "dcn.dlrmc"),
        "--buckets", "none", "--no-progress")
    res = run("dlrm-eval", str(d / "dcn.dlrmc"), "--data", str(d / "synth.npz"), "--split", "test")
    ours = re.search(r"^dlrmc\s+([\d.]+)", res.stdout, re.M).group(1)
    torch_auc = re.search(r"^pytorch\s+([\d.]+)", res.stdout, re.M).group(1)
    assert ours == torch_auc and abs(float(ours) - auc) < 1e-3, res.stdout


def test_eval_refuses_a_batch_size_below_one(tmp_path, capsys):
    """(0 was "range() arg 3 must not be zero", -5 "need at least one array to concatenate")"""
    from dlrmc.bench.eval_cli import main

    for size in ("0", "-5"):
        with pytest.raises(SystemExit) as stop:
            main([str(tmp_path), "--data", str(tmp_path / "d.npz"), "--batch-size", size])
        assert stop.value.code == 2
        assert f"--batch-size must be at least 1, got {size}" in capsys.readouterr().err
