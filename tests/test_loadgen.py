"""dlrm-bench --loadgen: the artifact as an MLPerf LoadGen system under test (bounded runs)."""

from __future__ import annotations

import numpy as np
import pytest

from dlrmc.bench import loadgen
from dlrmc.frontend.arch import Arch
from dlrmc.runtime.batch import random_batch

from conftest import TINY, run, torch_predict


def test_take_samples_picks_each_samples_bags():
    batch = random_batch(TINY.to_dict(), 40, bag_size=(3, 1, 2), seed=1, fixed=False,
                         empty_bags=0.3)
    ids = np.array([7, 0, 39, 7, 12])
    dense, lS_o, lS_i = loadgen.take_samples(batch, ids)
    np.testing.assert_array_equal(dense, batch[0][ids])
    for t in range(TINY.num_tables):
        offsets, indices = batch[1][t], batch[2][t]
        ends = np.append(offsets[1:], len(indices))
        want = [indices[offsets[s]:ends[s]] for s in ids]
        got_ends = np.append(lS_o[t][1:], len(lS_i[t]))
        got = [lS_i[t][a:b] for a, b in zip(lS_o[t], got_ends)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("scenario", loadgen.SCENARIOS)
def test_each_scenario_runs_valid(compiled, tmp_path, scenario):
    c = compiled(TINY)
    samples = random_batch(TINY.to_dict(), 128, bag_size=2, seed=3)
    result = loadgen.run(c.runtime, c.model, samples, scenario, str(tmp_path / scenario),
                         seconds=0.3, target_qps=300 if scenario == "server" else None,
                         max_batch=64)
    assert (tmp_path / scenario / "mlperf_log_detail.txt").is_file()
    if scenario == "server":
        # too few queries for LoadGen's early-stopping estimate in a test this short: the
        # server kept up with the schedule instead
        assert result["Performance constraints satisfied"] == "Yes", result
        assert float(result["Completed samples per second"]) > 0.9 * float(
            result["Scheduled samples per second"]), result
    else:
        assert result["Result is"] == "VALID", result


def test_accuracy_mode_matches_pytorch(compiled, tmp_path):
    c = compiled(TINY)
    samples = random_batch(TINY.to_dict(), 200, bag_size=3, seed=4, fixed=False,
                           empty_bags=0.2)
    result = loadgen.run(c.runtime, c.model, samples, "offline", str(tmp_path), seconds=0.2,
                         max_batch=64, accuracy=True)
    assert result["accuracy"]["samples"] == 200
    assert result["accuracy"]["max_abs_diff"] < 1e-6


def test_dlrm_bench_loadgen_command(tmp_path):
    res = run("dlrm-bench", "--preset", "tiny", "--loadgen", "singlestream", "--seconds", "0.3",
              "--samples", "64", "--loadgen-out", str(tmp_path / "logs"))
    assert "LoadGen singlestream" in res.stdout and "Result is: VALID" in res.stdout, res.stdout
    assert (tmp_path / "logs" / "mlperf_log_summary.txt").is_file()


CRITEO = Arch(4, (7,) * 26, (13, 8, 4), (8, 1))     # Criteo's 26 categorical columns


def _processed(path, rows: int, rng, top: int = 7) -> None:
    """A processed Criteo file (dlrm-data criteo's layout) with categories below ``top``."""
    np.savez(path, X_int=rng.integers(0, 50, (rows, 13)), X_cat=rng.integers(0, top, (rows, 26)),
             y=rng.integers(0, 2, rows), counts=np.full(26, 7))


def test_criteo_file_as_the_query_sample_library(compiled, tmp_path):
    """A processed Criteo file's test rows as LoadGen's samples: accuracy mode scores ROC AUC
    on their labels, as sklearn scores PyTorch's own predictions for those rows."""
    from sklearn.metrics import roc_auc_score

    from dlrmc.frontend.criteo import kaggle_split
    c = compiled(CRITEO)
    rng = np.random.default_rng(5)
    _processed(tmp_path / "data.npz", 1400, rng)          # test split: 100 rows
    samples, labels = loadgen.criteo_samples(str(tmp_path / "data.npz"), CRITEO.to_dict(), 64)
    assert len(labels) == 64 and samples[0].shape == (64, 13)
    with np.load(tmp_path / "data.npz") as z:
        assert np.array_equal(labels, z["y"][kaggle_split(1400, "test")][:64])
    result = loadgen.run(c.runtime, c.model, samples, "offline", str(tmp_path / "logs"),
                         seconds=0.2, accuracy=True, labels=labels)
    want = torch_predict(c.model, *samples)[:, 0]
    acc = result["accuracy"]
    assert acc["samples"] == 64 and acc["max_abs_diff"] < 1e-5
    assert acc["auc_pytorch"] == pytest.approx(roc_auc_score(labels, want), abs=1e-12)
    assert acc["auc"] == pytest.approx(acc["auc_pytorch"], abs=1e-3)
    assert "ROC AUC" in loadgen.report(result)


def test_criteo_file_that_does_not_fit_the_model_is_named(tmp_path):
    _processed(tmp_path / "big.npz", 1400, np.random.default_rng(6), top=9)
    with pytest.raises(ValueError, match=r"big.npz does not fit the model .*out of range for "
                                         r"table \d+ with 7 rows.*--max-ind-range"):
        loadgen.criteo_samples(str(tmp_path / "big.npz"), CRITEO.to_dict(), 64)


HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 10, 7, 10, 3, 1, 1)


def _mlperf_day(directory, rows: int, rng, suffix: str = "", compressed: bool = False,
                tables: int = 26) -> dict:
    """A day in MLPerf DLRM-v2's multi-hot Criteo layout, as mlcommons/inference's tools write
    it: float32 log-scaled dense [N, 13], one int32 [N, hot_k] array a table, labels [N, 1]."""
    directory.mkdir(exist_ok=True)
    day = {"dense": rng.standard_normal((rows, 13)).astype(np.float32) + 2,
           "sparse": {str(k): rng.integers(0, 7, (rows, HOT[k])).astype(np.int32)
                      for k in range(tables)},
           "labels": rng.integers(0, 2, (rows, 1)).astype(np.int32)}
    np.save(directory / f"day_23_dense{suffix}.npy", day["dense"])
    (np.savez_compressed if compressed else np.savez)(
        directory / f"day_23_sparse_multi_hot{suffix}.npz", **day["sparse"])
    np.save(directory / f"day_23_labels{suffix}.npy", day["labels"])
    return day


@pytest.mark.parametrize("suffix,compressed", [("", False), ("_sample", True)])
def test_mlperf_multihot_day_as_the_query_sample_library(compiled, tmp_path, suffix, compressed):
    """MLPerf's own multi-hot Criteo files as LoadGen's samples: sample s's bag in table k is
    row s of array k, the dense rows are taken as they are (already log-scaled), and accuracy
    mode's AUC is sklearn's on PyTorch's predictions for those rows."""
    from sklearn.metrics import roc_auc_score

    c = compiled(CRITEO)
    day = _mlperf_day(tmp_path / "day", 300, np.random.default_rng(7), suffix, compressed)
    samples, labels = loadgen.criteo_samples(str(tmp_path / "day"), CRITEO.to_dict(), 80)
    dense, lS_o, lS_i = samples
    np.testing.assert_array_equal(dense, day["dense"][:80])
    np.testing.assert_array_equal(labels, day["labels"][:80, 0])
    for k in range(26):
        for s in (0, 41, 79):
            np.testing.assert_array_equal(lS_i[k][lS_o[k][s]:lS_o[k][s] + HOT[k]],
                                          day["sparse"][str(k)][s])
        assert len(lS_i[k]) == 80 * HOT[k]
    result = loadgen.run(c.runtime, c.model, samples, "offline", str(tmp_path / "logs"),
                         seconds=0.2, accuracy=True, labels=labels)
    acc = result["accuracy"]
    assert acc["samples"] == 80 and acc["max_abs_diff"] < 1e-5
    want = torch_predict(c.model, *samples)[:, 0]
    assert acc["auc_pytorch"] == pytest.approx(roc_auc_score(labels, want), abs=1e-12)


def test_mlperf_multihot_day_that_does_not_fit_is_named(tmp_path):
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="holds no MLPerf multi-hot Criteo day"):
        loadgen.criteo_samples(str(tmp_path), CRITEO.to_dict(), 8)
    _mlperf_day(tmp_path / "short", 20, rng, tables=25)
    with pytest.raises(ValueError, match="the model has 26 tables"):
        loadgen.criteo_samples(str(tmp_path / "short"), CRITEO.to_dict(), 8)
    day = _mlperf_day(tmp_path / "big", 20, rng)
    day["sparse"]["3"][5, 1] = 7                    # table 3 has 7 rows
    np.savez(tmp_path / "big" / "day_23_sparse_multi_hot.npz", **day["sparse"])
    with pytest.raises(ValueError, match=r"does not fit the model .*out of range for table 3"):
        loadgen.criteo_samples(str(tmp_path / "big"), CRITEO.to_dict(), 8)
