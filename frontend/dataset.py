"""Batches from a processed Criteo ``.npz`` (the reference's layout), for training and eval.

A split (``criteo.kaggle_split``) is cut into mini-batches in file order (training batches
optionally shuffled per epoch); each batch is the model's input in the reference layout:
dense log(x + 1) features, one index per table per sample (``lS_o`` = 0..B-1), and labels.
With ``max_ind_range`` the categories are folded to ``value % max_ind_range`` at load, as the
reference's loader does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .criteo import NUM_CAT, dense_features, kaggle_split


@dataclass
class ProcessedData:
    x_int: np.ndarray
    x_cat: np.ndarray
    y: np.ndarray
    counts: np.ndarray

    @classmethod
    def load(cls, path: str, max_ind_range: int | None = None) -> "ProcessedData":
        with np.load(path, mmap_mode="r") as z:
            missing = {"X_int", "X_cat", "y", "counts"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a processed Criteo file: it lacks "
                                 f"{', '.join(sorted(missing))}")
            data = cls(z["X_int"], z["X_cat"], z["y"], z["counts"])
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

    def sample(self, rows: int, table_sizes, split: str = "train", batch_size: int = 1024):
        """The first ``rows`` rows of ``split`` as (dense_x, lS_o, lS_i) batches for a model
        with ``table_sizes`` rows per table (a calibration sample); an index outside its
        table is an error naming the column."""
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
