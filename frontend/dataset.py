"""Batches from a processed Criteo ``.npz`` (the reference's layout), for training and eval.

A split (``criteo.kaggle_split``) is cut into mini-batches in file order (training batches
optionally shuffled per epoch); each batch is the model's input in the reference layout:
dense log(x + 1) features, one index per table per sample (``lS_o`` = 0..B-1), and labels.
With ``max_ind_range`` the categories are folded to ``value % max_ind_range`` at load, as the
reference's loader does.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from .criteo import NUM_CAT, NUM_DENSE, dense_features, kaggle_split


# What reading an .npz that is cut short, damaged or not a zip at all raises.
NPZ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error)


@dataclass
class ProcessedData:
    x_int: np.ndarray
    x_cat: np.ndarray
    y: np.ndarray
    counts: np.ndarray

    @classmethod
    def load(cls, path: str, max_ind_range: int | None = None) -> "ProcessedData":
        try:
            with np.load(path, mmap_mode="r") as z:
                missing = {"X_int", "X_cat", "y", "counts"} - set(z.files)
                if missing:
                    raise ValueError(f"{path} is not a processed Criteo file: it lacks "
                                     f"{', '.join(sorted(missing))}")
                data = cls(z["X_int"], z["X_cat"], z["y"], z["counts"])
        except NPZ_ERRORS as e:
            raise ValueError(f"{path} is not a readable processed Criteo file ({e})") from None
        if data.x_cat.ndim != 2 or data.x_cat.shape[1] != NUM_CAT or len(data.y) != len(data.x_cat):
            raise ValueError(f"{path}: X_cat must be [N, {NUM_CAT}] with one label per row")
        if max_ind_range:
            data.x_cat = data.x_cat % max_ind_range
            data.counts = np.minimum(data.counts, max_ind_range)
        return data

    def table_sizes(self) -> tuple[int, ...]:
        """Rows per embedding table: the distinct values per column (at least 1)."""
        return tuple(int(max(c, 1)) for c in self.counts)

    def batches(self, split: str, batch_size: int, shuffle_seed: int | None = None):
        """(dense_x, lS_o, lS_i, y) mini-batches of ``split`` (the last one may be short)."""
        rows = kaggle_split(len(self.y), split) if split != "all" else np.arange(len(self.y))
        if shuffle_seed is not None:
            rows = np.random.default_rng(shuffle_seed).permutation(rows)
        for start in range(0, len(rows), batch_size):
            take = np.sort(rows[start:start + batch_size]) if shuffle_seed is None \
                else rows[start:start + batch_size]
            cats = np.asarray(self.x_cat[take], np.int64)
            n = len(take)
            yield (dense_features(np.asarray(self.x_int[take])),
                   np.tile(np.arange(n, dtype=np.int64), (NUM_CAT, 1)),
                   [np.ascontiguousarray(cats[:, k]) for k in range(NUM_CAT)],
                   np.asarray(self.y[take], np.float32))

    def sample(self, rows: int, arch, split: str = "train", batch_size: int = 1024):
        """The first ``rows`` rows of ``split`` as (dense_x, lS_o, lS_i) batches for a model of
        ``arch`` (a calibration sample); a model that does not take Criteo's 13 dense and 26
        categorical features, or an index outside its table, is an error naming it."""
        table_sizes = arch.embedding_sizes
        if (len(table_sizes), arch.mlp_bot[0]) != (NUM_CAT, NUM_DENSE):
            raise ValueError(f"the data holds Criteo's {NUM_DENSE} dense and {NUM_CAT} "
                             f"categorical features; the model takes {arch.mlp_bot[0]} dense "
                             f"features and has {len(table_sizes)} tables")
        out, left = [], int(rows)
        for dense, offsets, indices, _ in self.batches(split, min(batch_size, max(rows, 1))):
            if left <= 0:
                break
            for k, (idx, size) in enumerate(zip(indices, table_sizes)):
                if len(idx) and (idx.min() < 0 or idx.max() >= size):
                    raise ValueError(f"the data's categorical column {k} has index "
                                     f"{int(idx.max())}, outside the model's table of {size} "
                                     "rows (was the model trained with --max-ind-range?)")
            take = min(left, len(dense))
            out.append((dense[:take], offsets[:, :take], [i[:take] for i in indices]))
            left -= take
        return out

    def num_batches(self, split: str, batch_size: int) -> int:
        n = len(self.y) if split == "all" else len(kaggle_split(len(self.y), split))
        return -(-n // batch_size)


MULTIHOT_DAY = 23      # MLPerf DLRM-v2 evaluates on the Criteo 1TB set's last day
MULTIHOT_SUFFIXES = ("", "_sample", "_debug")


def _npy_rows(f, what: str, rows: int) -> np.ndarray:
    """The first ``rows`` rows of the .npy stream ``f`` (read no further)."""
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if fortran or len(shape) != 2 or dtype.kind not in "iu":
        raise ValueError(f"{what} must be a C-order 2-D integer array, got {dtype} {list(shape)}"
                         f"{' in Fortran order' if fortran else ''}")
    rows = min(rows, shape[0])
    data = f.read(rows * shape[1] * dtype.itemsize)
    if len(data) < rows * shape[1] * dtype.itemsize:
        raise ValueError(f"{what} is truncated")
    return np.frombuffer(data, dtype).reshape(rows, shape[1])


def multihot_criteo(path: str, rows: int, tables: int):
    """The first ``rows`` samples of MLPerf DLRM-v2's multi-hot Criteo day (the files
    mlcommons/inference's ``multihot_criteo.py`` reads: ``day_23_dense{s}.npy`` float32
    [N, 13], already log-scaled by TorchRec's preprocessing; ``day_23_sparse_multi_hot{s}.npz``,
    one int32 [N, hot_k] array a table named ``0`` .. ``25``; ``day_23_labels{s}.npy``), with
    ``s`` one of ``MULTIHOT_SUFFIXES``, in the directory ``path``. Returns a reference-layout
    batch (every bag of table k holds hot_k indices) and the labels. Only those rows are read,
    so the full 1TB day is never loaded."""
    for s in MULTIHOT_SUFFIXES:
        names = [os.path.join(path, f"day_{MULTIHOT_DAY}_{kind}{s}.{ext}") for kind, ext in
                 (("dense", "npy"), ("sparse_multi_hot", "npz"), ("labels", "npy"))]
        if all(os.path.isfile(n) for n in names):
            break
    else:
        raise ValueError(f"{path} holds no MLPerf multi-hot Criteo day: it wants "
                         f"day_{MULTIHOT_DAY}_dense.npy, day_{MULTIHOT_DAY}_sparse_multi_hot.npz "
                         f"and day_{MULTIHOT_DAY}_labels.npy (or their _sample / _debug files)")
    dense_path, sparse_path, labels_path = names
    dense = np.load(dense_path, mmap_mode="r")
    labels = np.load(labels_path, mmap_mode="r")
    if dense.ndim != 2 or dense.dtype.kind != "f":
        raise ValueError(f"{dense_path} must be float [N, 13], got {dense.dtype} "
                         f"{list(dense.shape)}")
    if labels.shape[0] != dense.shape[0]:
        raise ValueError(f"{labels_path} has {labels.shape[0]} rows, {dense_path} {dense.shape[0]}")
    rows = min(rows, dense.shape[0])
    with zipfile.ZipFile(sparse_path) as z:
        have = {n.removesuffix(".npy") for n in z.namelist()}
        want = [str(k) for k in range(tables)]
        if have != set(want):
            raise ValueError(f"{sparse_path} holds arrays {sorted(have, key=str)[:30]}, the model "
                             f"has {tables} tables (wants {want[0]} .. {want[-1]})")
        sparse = []
        for k in want:
            with z.open(f"{k}.npy") as f:
                sparse.append(_npy_rows(f, f"{sparse_path}[{k}]", rows))
    if any(len(s) != rows for s in sparse):
        raise ValueError(f"{sparse_path}: a table has fewer rows than {dense_path}")
    lS_o = np.stack([np.arange(rows, dtype=np.int64) * s.shape[1] for s in sparse])
    lS_i = [s.reshape(-1).astype(np.int64) for s in sparse]
    return ((np.array(dense[:rows], np.float32), lS_o, lS_i),
            np.asarray(labels[:rows]).reshape(-1).astype(np.int32))
