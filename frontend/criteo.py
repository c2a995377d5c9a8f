"""Criteo click logs: the raw TSV format, its preprocessing, and the Kaggle day split.

Raw line: ``label \\t I1..I13 \\t C1..C26``; integers in decimal, categories as 8 hex digits
(32-bit values; all 32 bits are kept: the reference's int32 fails from 2^31 up under numpy
2); an empty field means 0 / missing.

Preprocessing, with facebookresearch/dlrm's ``data_utils`` semantics:

- dense: negative values clamp to 0; stored raw (``X_int``), log(x + 1) applied when
  batches are loaded (``dense_features``), as the reference does;
- categorical: per column, values map to dense indices in first-seen order (``counts`` =
  distinct values per column), or with ``max_ind_range`` to ``value % max_ind_range``
  (``counts`` = ``max_ind_range``); a missing category is the value 0;
- output: the reference's processed ``.npz`` (``X_int`` int32 [N, 13], ``X_cat`` int32
  [N, 26], ``y`` int32 [N], ``counts`` int32 [26]), rows in file order.

``preprocess`` streams: rows go to disk-backed arrays in a temporary directory next to the
output, and the ``.npz`` appears only when complete. Memory is the per-column dictionaries
(with ``max_ind_range``: none) plus one chunk of lines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ..artifact.staging import check_output_file, staging_dir

NUM_DENSE = 13
NUM_CAT = 26
FIELDS = 1 + NUM_DENSE + NUM_CAT
KAGGLE_DAYS = 7
CHUNK_LINES = 1 << 16


class MalformedLine(ValueError):
    """A raw line that is not a Criteo record; ``line`` is its 1-based number."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason = line, reason


def parse_line(text: str, number: int = 0) -> tuple[int, list[int], list[int]]:
    """(label, 13 dense ints clamped at 0, 26 category values as unsigned 32-bit ints)."""
    parts = text.rstrip("\r\n").split("\t")
    if len(parts) != FIELDS:
        hint = (": no label column (Kaggle's test.txt has none; only labelled rows can be used)"
                if len(parts) == FIELDS - 1 else "")
        raise MalformedLine(number, f"{len(parts)} tab-separated fields, expected {FIELDS}{hint}")
    try:
        label = int(parts[0]) if parts[0] else 0
    except ValueError:
        raise MalformedLine(number, f"label {parts[0]!r} is not an integer") from None
    if label not in (0, 1):
        raise MalformedLine(number, f"label {parts[0]!r} is not 0 or 1")
    dense = []
    for k, v in enumerate(parts[1:1 + NUM_DENSE]):
        try:
            dense.append(max(int(v), 0) if v else 0)
        except ValueError:
            raise MalformedLine(number, f"dense feature I{k + 1} {v!r} is not an integer") \
                from None
    cats = []
    for k, v in enumerate(parts[1 + NUM_DENSE:]):
        try:
            value = int(v, 16) if v else 0
        except ValueError:
            raise MalformedLine(number, f"category C{k + 1} {v!r} is not hexadecimal") from None
        if not 0 <= value < 1 << 32 or v.startswith(("-", "+", "0x", "0X")):
            raise MalformedLine(number, f"category C{k + 1} {v!r} is not 32-bit hexadecimal")
        cats.append(value)
    return label, dense, cats


@dataclass
class Stats:
    rows: int = 0
    malformed: int = 0
    first_malformed: list[str] = field(default_factory=list)   # the first few, with numbers


class _Columns:
    """Category value -> index per column, in first-seen order (or modulo a range)."""

    def __init__(self, max_ind_range: int | None):
        self.max_ind_range = max_ind_range
        self.maps: list[dict[int, int]] = [{} for _ in range(NUM_CAT)]

    def encode(self, cats: np.ndarray) -> np.ndarray:
        if self.max_ind_range:
            return (cats % self.max_ind_range).astype(np.int32)
        out = np.empty(cats.shape, np.int32)
        for k, m in enumerate(self.maps):
            col = cats[:, k].tolist()
            out[:, k] = [m.setdefault(v, len(m)) for v in col]
        return out

    def counts(self) -> np.ndarray:
        if self.max_ind_range:
            return np.full(NUM_CAT, self.max_ind_range, np.int32)
        return np.array([len(m) for m in self.maps], np.int32)


def _chunks(lines: Iterable[str], strict: bool, stats: Stats):
    labels, dense, cats = [], [], []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            label, d, c = parse_line(text, number)
        except MalformedLine as e:
            if strict:
                raise
            stats.malformed += 1
            if len(stats.first_malformed) < 10:
                stats.first_malformed.append(str(e))
            continue
        labels.append(label)
        dense.append(d)
        cats.append(c)
        if len(labels) == CHUNK_LINES:
            yield labels, dense, cats
            labels, dense, cats = [], [], []
    if labels:
        yield labels, dense, cats


@contextlib.contextmanager
def _truncation_named(path: str):
    """A compressed file that ends early (an interrupted download) as an error naming it."""
    try:
        yield
    except EOFError as e:
        raise ValueError(f"{path} ends early ({e}); was its download cut short?") from None


def _open_text(path: str):
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


class _Growing:
    """A disk-backed 2-D array that grows by chunks (a raw file, then a .npy header)."""

    def __init__(self, path: str, width: int, dtype):
        self.path, self.width, self.dtype, self.rows = path, width, np.dtype(dtype), 0
        self.file = open(path + ".raw", "wb")

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, self.dtype).reshape(-1, self.width)
        self.file.write(block.tobytes())
        self.rows += block.shape[0]

    def finish(self, squeeze: bool = False) -> str:
        self.file.close()
        shape = (self.rows,) if squeeze else (self.rows, self.width)
        with open(self.path, "wb") as out, open(self.path + ".raw", "rb") as raw:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": shape})
            shutil.copyfileobj(raw, out, 1 << 24)
        os.remove(self.path + ".raw")
        return self.path


def preprocess(raw_path: str, out_path: str, max_ind_range: int | None = None,
               strict: bool = False, progress: Callable[[int], None] | None = None) -> Stats:
    """Raw Criteo TSV (optionally .gz) -> the reference's processed ``.npz`` at ``out_path``.

    Malformed lines are skipped and counted (the first few kept with their line numbers);
    with ``strict`` the first one raises ``MalformedLine``. ``progress(bytes_read)`` is
    called per chunk. The output appears only when complete.
    """
    if max_ind_range is not None and max_ind_range < 1:
        raise ValueError(f"--max-ind-range must be positive, got {max_ind_range}")
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    check_output_file(out_path, (raw_path,))
    tmp = staging_dir(out_path)      # also sweeps what a killed run left
    stats, columns = Stats(), _Columns(max_ind_range)
    try:
        arrays = {"X_int": _Growing(os.path.join(tmp, "X_int.npy"), NUM_DENSE, np.int32),
                  "X_cat": _Growing(os.path.join(tmp, "X_cat.npy"), NUM_CAT, np.int32),
                  "y": _Growing(os.path.join(tmp, "y.npy"), 1, np.int32)}
        with _open_text(raw_path) as f, _truncation_named(raw_path):
            for labels, dense, cats in _chunks(f, strict, stats):
                dense_a = np.minimum(np.array(dense, np.int64), np.iinfo(np.int32).max)
                arrays["X_int"].append(dense_a)
                arrays["X_cat"].append(columns.encode(np.array(cats, np.uint32)
                                                      .astype(np.int64)))
                arrays["y"].append(np.array(labels, np.int32))
                stats.rows += len(labels)
                if progress:
                    progress(f.buffer.tell() if hasattr(f, "buffer") else 0)
        if not stats.rows:
            raise ValueError(f"{raw_path} holds no Criteo record" + (
                f" (first: {stats.first_malformed[0]})" if stats.first_malformed else ""))
        np.save(os.path.join(tmp, "counts.npy"), columns.counts())
        paths = [arrays["X_int"].finish(), arrays["X_cat"].finish(),
                 arrays["y"].finish(squeeze=True), os.path.join(tmp, "counts.npy")]
        partial = os.path.join(tmp, "out.npz")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for p in paths:
                z.write(p, os.path.basename(p))
        os.replace(partial, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def dense_features(x_int: np.ndarray) -> np.ndarray:
    """The model's dense input: log(x + 1) of the clamped raw integers, float32."""
    return np.log1p(np.maximum(x_int, 0).astype(np.float32))


def kaggle_split(rows: int, split: str) -> np.ndarray:
    """Row indices of ``split`` ("train", "test", "val") in the reference's Kaggle split:
    the rows in 7 consecutive days of near-equal size (the first ``rows % 7`` one larger),
    days 0-5 train, day 6 halved into test then validation."""
    per_day, extra = divmod(rows, KAGGLE_DAYS)
    sizes = [per_day + (1 if d < extra else 0) for d in range(KAGGLE_DAYS)]
    last_start = sum(sizes[:-1])
    if split == "train":
        return np.arange(0, last_start)
    test, val = np.array_split(np.arange(last_start, rows), 2)
    if split == "test":
        return test
    if split == "val":
        return val
    raise ValueError(f"split must be train, test or val, got {split!r}")
