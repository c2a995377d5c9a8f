"""Input checks that run before any native code: the compiled gathers trust their indices.

Everything is checked against the artifact's manifest: dtypes, ranks and shapes, offsets
(start at 0, non-decreasing, within the table's index count) and every index inside its
table. A bad index would make native code read arbitrary memory, so it is a ``ValueError``
naming the table and position, never a crash or silent garbage.
"""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """A batch that does not fit the artifact."""


def _int_array(value, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must be an integer array, got dtype {arr.dtype}")
    return arr


def check_batch(arch: dict, dense_x, lS_o, lS_i) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Validate a batch in the reference layout; return it as (float32, int64, [int64]) arrays.

    ``lS_i`` is a list of T 1-D arrays or a [T, N] array.
    """
    rows = arch["embedding_sizes"]
    num_tables, num_dense = len(rows), arch["mlp_bot"][0]
    dense = np.asarray(dense_x)
    if dense.dtype != np.float32:
        raise InputError(f"dense_x must be float32, got {dense.dtype} (use .astype(np.float32))")
    if dense.ndim != 2 or dense.shape[1] != num_dense or dense.shape[0] < 1:
        raise InputError(f"dense_x must have shape [batch >= 1, {num_dense}], got "
                         f"{list(dense.shape)}")
    batch = dense.shape[0]
    offsets = _int_array(lS_o, "lS_o")
    if offsets.shape != (num_tables, batch):
        raise InputError(f"lS_o must have shape [{num_tables}, {batch}] (tables, batch), got "
                         f"{list(offsets.shape)}")
    if isinstance(lS_i, np.ndarray) and lS_i.ndim == 2:
        lS_i = list(lS_i)
    if isinstance(lS_i, np.ndarray) or not hasattr(lS_i, "__len__"):
        raise InputError("lS_i must be a list of 1-D index arrays, one per table, or a [T, N] array")
    if len(lS_i) != num_tables:
        raise InputError(f"lS_i has {len(lS_i)} index arrays, the model has {num_tables} tables")
    indices = []
    for k, idx in enumerate(lS_i):
        idx = _int_array(idx, f"lS_i[{k}]")
        if idx.ndim != 1:
            raise InputError(f"lS_i[{k}] must be 1-D, got shape {list(idx.shape)}")
        off = offsets[k]
        if off[0] != 0:
            raise InputError(f"lS_o[{k}][0] is {off[0]}; the first bag must start at 0")
        step = np.diff(off)
        if (step < 0).any():
            b = int(np.argmax(step < 0)) + 1
            raise InputError(f"lS_o[{k}] decreases at position {b} ({off[b - 1]} -> {off[b]}); "
                             "offsets must be non-decreasing")
        if off[-1] > len(idx):
            raise InputError(f"lS_o[{k}][{batch - 1}] = {off[-1]} is past the end of lS_i[{k}] "
                             f"({len(idx)} indices)")
        bad = (idx < 0) | (idx >= rows[k])
        if bad.any():
            p = int(np.argmax(bad))
            raise InputError(f"lS_i[{k}][{p}] = {idx[p]} is out of range for table {k} with "
                             f"{rows[k]} rows")
        indices.append(np.ascontiguousarray(idx, dtype=np.int64))
    return (np.ascontiguousarray(dense), np.ascontiguousarray(offsets, dtype=np.int64), indices)
