"""Criteo preprocessing against a hand-checked file, the Kaggle split, and the synthetic
generator's determinism and structure."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from dlrmc.frontend.criteo import (MalformedLine, dense_features, kaggle_split, parse_line,
                                   preprocess)
from dlrmc.frontend.synth import generate


def _line(label, dense, cats):
    return "\t".join([label] + dense + cats) + "\n"


CATS_A = ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf", "de7995b8",
          "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef",
          "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c",
          "", "3a171ecb", "c5c50484", "e8b83407", "9727dd16"]
CATS_B = ["68fd1e64", "ffffffff", "80000000", "7b4723c4", "", "7e0ccccf", "de7995b8",
          "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef",
          "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c",
          "0", "3a171ecb", "c5c50484", "e8b83407", "00000000"]
ROWS = [
    _line("0", ["1", "1", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2"], CATS_A),
    _line("1", ["", "-1", "", "", "0", "", "", "", "", "", "", "", ""], CATS_B),
    "1\t2\t3\n",                                                        # line 3: 3 fields
    _line("0", ["7"] * 13, CATS_A[:5] + ["zz12"] + CATS_A[6:]),         # line 4: not hex
    _line("1", ["7", "x"] + ["7"] * 11, CATS_A),                        # line 5: not an int
    _line("1", ["-5", "3", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "2147483647"],
          CATS_B),
]


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(ROWS))
    return path


def test_preprocess_matches_the_hand_checked_file(raw, tmp_path):
    stats = preprocess(str(raw), str(tmp_path / "p.npz"))
    assert stats.rows == 3 and stats.malformed == 3
    assert [m.split(":")[0] for m in stats.first_malformed] == ["line 3", "line 4", "line 5"]
    d = np.load(tmp_path / "p.npz")
    assert set(d.files) == {"X_int", "X_cat", "y", "counts"}
    np.testing.assert_array_equal(d["y"], [0, 1, 1])
    np.testing.assert_array_equal(d["X_int"], [
        [1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2],     # empty -> 0
        [0] * 13,                                           # -1 clamps to 0
        [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2147483647]])
    x_cat = d["X_cat"]
    assert x_cat.dtype == np.int32 and x_cat.shape == (3, 26)
    # first-seen order per column: row 0 gives index 0; row 1 a new value where it differs
    expect_row1 = [0 if a == b or (int(a or "0", 16) == int(b or "0", 16)) else 1
                   for a, b in zip(CATS_A, CATS_B)]
    np.testing.assert_array_equal(x_cat[0], [0] * 26)
    np.testing.assert_array_equal(x_cat[1], expect_row1)
    np.testing.assert_array_equal(x_cat[2], x_cat[1])   # same categories as row 1
    assert x_cat[1, 1] == 1 and x_cat[1, 2] == 1        # 0xffffffff and 0x80000000 kept apart
    assert x_cat[1, 21] == 0                            # "" and "0" are both the value 0
    np.testing.assert_array_equal(d["counts"], [1 + v for v in expect_row1])
    np.testing.assert_allclose(dense_features(d["X_int"])[0, :3], np.log([2, 2, 6]), rtol=1e-6)


def test_max_ind_range_hashes_the_32_bit_values(raw, tmp_path):
    preprocess(str(raw), str(tmp_path / "h.npz"), max_ind_range=1000)
    d = np.load(tmp_path / "h.npz")
    values = [[int(v or "0", 16) for v in cats] for cats in (CATS_A, CATS_B, CATS_B)]
    np.testing.assert_array_equal(d["X_cat"], np.array(values, np.int64) % 1000)
    np.testing.assert_array_equal(d["counts"], [1000] * 26)


def test_strict_fails_on_the_first_bad_line_and_writes_nothing(raw, tmp_path):
    with pytest.raises(MalformedLine, match="line 3: 3 tab-separated fields"):
        preprocess(str(raw), str(tmp_path / "s.npz"), strict=True)
    assert list(tmp_path.iterdir()) == [raw]
    res = subprocess.run(["dlrm-data", "criteo", str(raw), "-o", str(tmp_path / "c.npz"),
                          "--strict", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 2 and "line 3" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c.npz").exists()
    res = subprocess.run(["dlrm-data", "criteo", str(raw), "-o", str(tmp_path / "c.npz"),
                          "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0 and "3 rows" in res.stdout
    assert "skipped 3 malformed" in res.stdout and "line 4" in res.stdout


def test_a_file_with_no_record_is_an_error_not_an_empty_npz(tmp_path):
    """Kaggle's test.txt (no label column) and an empty file: exit 2 naming why, no output."""
    unlabelled = tmp_path / "test.txt"
    unlabelled.write_text("".join(r.split("\t", 1)[1] for r in ROWS[:2]))
    (tmp_path / "empty.txt").write_text("")
    for name, message in [("test.txt", "holds no Criteo record (first: line 1: 39 tab-separated "
                                        "fields, expected 40: no label column"),
                          ("empty.txt", "holds no Criteo record")]:
        res = subprocess.run(["dlrm-data", "criteo", str(tmp_path / name), "-o",
                              str(tmp_path / "out.npz"), "--no-progress"],
                             capture_output=True, text=True)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "test.txt"]


def test_a_truncated_gzip_is_named_and_writes_nothing(raw, tmp_path):
    import gzip

    whole = gzip.compress(("".join(ROWS[:2]) * 2000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.txt.gz ends early .*download cut short"):
        preprocess(str(tmp_path / "cut.txt.gz"), str(tmp_path / "out.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.txt.gz", "train.txt"]


def test_a_cut_or_corrupt_processed_file_is_named(raw, tmp_path):
    """An .npz cut short or with a damaged member: ValueError naming it (was BadZipFile
    tracebacks from dlrm-train, dlrm-eval and dlrm-compile --calibration-data)."""
    from dlrmc.frontend.dataset import ProcessedData

    preprocess(str(raw), str(tmp_path / "p.npz"))
    whole = (tmp_path / "p.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    np.savez_compressed(tmp_path / "z.npz", X_int=np.zeros((999, 13), np.int32),
                        X_cat=np.zeros((999, 26), np.int32), y=np.zeros(999, np.int32),
                        counts=np.ones(26, np.int32))
    damaged = bytearray((tmp_path / "z.npz").read_bytes())
    damaged[200:260] = b"x" * 60                       # inside X_int's compressed bytes
    (tmp_path / "bad.npz").write_bytes(bytes(damaged))
    for name in ("cut.npz", "bad.npz"):
        with pytest.raises(ValueError, match=f"{name} is not a readable processed Criteo file"):
            ProcessedData.load(str(tmp_path / name))
    res = subprocess.run(["dlrm-train", "--data", str(tmp_path / "cut.npz")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a readable processed Criteo file" in res.stderr
    assert "Traceback" not in res.stderr


def test_dlrm_train_refuses_a_checkpoint_path_before_training(raw, tmp_path, capsys):
    """--save-model naming a directory, a missing directory or the data itself: refused before
    the first epoch (it failed after the last one, or replaced the data)."""
    from dlrmc.frontend.train_cli import main

    preprocess(str(raw), str(tmp_path / "p.npz"))
    before = (tmp_path / "p.npz").read_bytes()
    for path, message in [(tmp_path, "is a directory"), (tmp_path / "no" / "m.pt", "no directory"),
                          (tmp_path / "p.npz", "is the input; not overwriting it")]:
        assert main(["--data", str(tmp_path / "p.npz"), "--save-model", str(path)]) == 2
        err = capsys.readouterr()
        assert message in err.err and "batches per epoch" not in err.out, (path, err)
    assert (tmp_path / "p.npz").read_bytes() == before
    for flags, message in [(["--mini-batch-size", "0"], "--mini-batch-size must be at least 1"),
                           (["--nepochs", "0"], "--nepochs must be at least 1"),
                           (["--learning-rate", "-1"], "--learning-rate must be positive"),
                           (["--learning-rate", "nan"], "--learning-rate must be positive")]:
        with pytest.raises(SystemExit) as stop:     # was a ZeroDivisionError, a silent no-op,
            main(["--data", str(tmp_path / "p.npz"), *flags])   # torch's ValueError
        assert stop.value.code == 2 and message in capsys.readouterr().err, flags


def test_an_output_that_is_the_input_or_a_directory_is_refused_untouched(raw, tmp_path):
    """`-o` naming the raw file itself (directly or through a link) would have replaced the
    user's click log with the .npz; a directory got a raw rename error naming a temp file."""
    text = raw.read_text()
    (tmp_path / "link.txt").symlink_to(raw)
    (tmp_path / "d").mkdir()
    for args, message in [(["criteo", str(raw), "-o", str(raw)], "is the input"),
                          (["criteo", str(tmp_path / "link.txt"), "-o", str(raw)], "is the input"),
                          (["criteo", str(raw), "-o", str(tmp_path / "d")], "is a directory"),
                          (["synth", "--rows", "5", "-o", str(tmp_path / "d")], "is a directory")]:
        res = subprocess.run(["dlrm-data", *args, "--no-progress"], capture_output=True, text=True)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    assert raw.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "link.txt", "train.txt"]
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("bad,message", [
    ("2" + "\t" * 39, "is not 0 or 1"),
    ("0" + "\t" * 14 + "\t".join(["1" * 9] * 26), "not 32-bit"),
    ("0" + "\t" * 14 + "\t".join(["-1"] * 26), "not 32-bit"),
])
def test_parse_line_rejects(bad, message):
    with pytest.raises(MalformedLine, match=message):
        parse_line(bad, 7)


@pytest.mark.parametrize("rows", [7, 23, 45840617])
def test_kaggle_split(rows):
    train, test, val = (kaggle_split(rows, s) for s in ("train", "test", "val"))
    per_day, extra = divmod(rows, 7)
    last_day = per_day   # the extra rows go to the first days
    assert len(train) == rows - last_day
    assert len(test) == (last_day + 1) // 2 and len(val) == last_day // 2
    np.testing.assert_array_equal(np.concatenate([train, test, val]), np.arange(rows))
    if rows == 23:   # days of 4, 4, 3, 3, 3, 3, 3 rows
        assert train[-1] == 19 and list(test) == [20, 21] and list(val) == [22]
    with pytest.raises(ValueError):
        kaggle_split(rows, "dev")


def test_synthetic_logs_are_deterministic_and_realistic(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    auc_a = generate(str(a), 40000, seed=3, max_vocab=5000)
    auc_b = generate(str(b), 40000, seed=3, max_vocab=5000)
    generate(str(c), 40000, seed=4, max_vocab=5000)
    assert a.read_bytes() == b.read_bytes() and auc_a == auc_b
    assert a.read_bytes() != c.read_bytes()
    assert 0.6 < auc_a < 0.99
    stats = preprocess(str(a), str(tmp_path / "a.npz"), strict=True)
    assert stats.rows == 40000
    d = np.load(tmp_path / "a.npz")
    assert 0.1 < d["y"].mean() < 0.6
    lines = a.read_text().splitlines()
    fields = np.array([ln.split("\t") for ln in lines[:5000]])
    assert (fields[:, 1:] == "").mean() > 0.02                   # missing values
    assert any(v.startswith("-") for v in fields[:, 2])          # negative I2, as in Criteo
    # power law: the most frequent value of a large column covers far more than its share
    col = d["X_cat"][:, 2]
    top = np.bincount(col).max() / len(col)
    assert top > 20 / d["counts"][2]
    assert d["counts"].max() <= 5001


def test_reference_random_input_mode():
    from dlrmc.runtime.batch import random_batch

    arch = {"embedding_sizes": [1000, 50, 7], "mlp_bot": [13, 8]}
    d, o, i = random_batch(arch, 300, bag_size=5, seed=1)
    assert d.shape == (300, 13) and o.shape == (3, 300)
    assert all(len(x) == 1500 for x in i) and (np.diff(o, axis=1) == 5).all()
    _, o, i = random_batch(arch, 300, bag_size=5, seed=1, fixed=False)
    sizes = np.diff(np.concatenate([o, [[len(x)] for x in i]], axis=1), axis=1)
    assert sizes.min() == 1 and sizes.max() == 5 and len(set(sizes.ravel())) == 5
    _, _, uni = random_batch(arch, 4000, bag_size=1, seed=2)
    _, _, zipf = random_batch(arch, 4000, bag_size=1, seed=2, distribution="zipf")
    for x, rows in zip(zipf, arch["embedding_sizes"]):
        assert x.min() >= 0 and x.max() < rows
    share = lambda x: np.bincount(x).max() / len(x)  # noqa: E731
    assert share(zipf[0]) > 5 * share(uni[0])          # a hot row under Zipf
    with pytest.raises(ValueError, match="distribution"):
        random_batch(arch, 4, distribution="normal")
    res = subprocess.run(["dlrm-run", "--help"], capture_output=True, text=True)
    assert "--num-indices-per-lookup" in res.stdout and "--index-distribution" in res.stdout
