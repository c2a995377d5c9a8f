"""Synthetic batches in the reference layout (numpy only), for ``dlrm-run --random`` and checks."""

from __future__ import annotations

import numpy as np


def random_batch(arch: dict, batch: int, bag_size: int = 1, seed: int = 0, empty_bags: float = 0.0):
    """dense_x [B, D] float32, lS_o [T, B] int64, lS_i list of T int64 arrays.

    Bags hold ``bag_size`` indices each (uniform over the table), a fraction ``empty_bags`` none.
    """
    rng = np.random.default_rng(seed)
    rows = arch["embedding_sizes"]
    dense = rng.random((batch, arch["mlp_bot"][0]), dtype=np.float32)
    offsets, indices = [], []
    for n in rows:
        sizes = np.full(batch, bag_size, np.int64)
        if empty_bags:
            sizes[rng.random(batch) < empty_bags] = 0
        offsets.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        indices.append(rng.integers(0, n, int(sizes.sum()), dtype=np.int64))
    return dense, np.stack(offsets).astype(np.int64), indices


def load_npz(path: str, num_tables: int):
    """A batch from an .npz with keys dense_x, lS_o, and lS_i ([T, N]) or lS_i_0 .. lS_i_{T-1}."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        missing = {"dense_x", "lS_o"} - keys
        if missing:
            raise ValueError(f"{path} lacks {', '.join(sorted(missing))}")
        if "lS_i" in keys:
            lS_i = z["lS_i"]
        else:
            names = [f"lS_i_{k}" for k in range(num_tables)]
            absent = [n for n in names if n not in keys]
            if absent:
                raise ValueError(f"{path} has neither lS_i nor {', '.join(absent)}")
            lS_i = [z[n] for n in names]
        return z["dense_x"], z["lS_o"], lS_i
