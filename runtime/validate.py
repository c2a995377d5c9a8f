"""Input checks that run before any native code: the compiled gathers trust their indices.

Everything is checked against the artifact's manifest: dtypes, ranks and shapes, offsets
(start at 0, non-decreasing, within the table's index count) and every index inside its
table, all compared as int64 (an unsigned value past int64's range is refused, never wrapped).
A bad index would make native code read arbitrary memory, so it is a ``ValueError`` naming
the table and position, never a crash or silent garbage.

Dense features must be finite: a NaN or inf is refused with its row and column. (PyTorch
would give NaN for such a row; the compiled ReLU, ``max(v, 0)``, would turn a NaN into a
confident prediction, so the batch is refused instead of answered wrongly.)
"""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """A batch that does not fit the artifact."""


_INT64_MAX = np.iinfo(np.int64).max


def _int_array(value, what: str) -> np.ndarray:
    """``value`` as an int64 array; any integer dtype, an unsigned value above int64's range
    refused with its position."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":  # np.issubdtype costs more than the model at batch 1
        raise InputError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > _INT64_MAX:
        pos = np.unravel_index(int(np.argmax(arr > _INT64_MAX)), arr.shape)
        raise InputError(f"{what}[{', '.join(map(str, pos))}] = {arr[pos]} is beyond int64's range")
    return arr.astype(np.int64, copy=False)


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
    finite = np.isfinite(dense)
    if not finite.all():
        r, c = divmod(int(np.argmin(finite)), num_dense)
        raise InputError(f"dense_x[{r}, {c}] is {dense[r, c]}; dense features must be finite")
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
        indices.append(np.ascontiguousarray(idx))
    # All tables at once: a per-table loop of numpy calls costs more than the model at batch 1.
    lengths = np.array([len(i) for i in indices], np.int64)
    if (offsets[:, 0] != 0).any():
        k = int(np.argmax(offsets[:, 0] != 0))
        raise InputError(f"lS_o[{k}][0] is {offsets[k, 0]}; the first bag must start at 0")
    falling = offsets[:, 1:] < offsets[:, :-1]     # not np.diff: it overflows at the edges
    if falling.any():
        k, b = divmod(int(np.argmax(falling)), batch - 1)
        raise InputError(f"lS_o[{k}] decreases at position {b + 1} ({offsets[k, b]} -> "
                         f"{offsets[k, b + 1]}); offsets must be non-decreasing")
    past = offsets[:, -1] > lengths
    if past.any():
        k = int(np.argmax(past))
        raise InputError(f"lS_o[{k}][{batch - 1}] = {offsets[k, -1]} is past the end of lS_i[{k}] "
                         f"({lengths[k]} indices)")
    flat = np.concatenate(indices)
    # As unsigned, a negative index is huge: one comparison catches both ends.
    bad = flat.view(np.uint64) >= np.repeat(np.asarray(rows, np.uint64), lengths)
    if bad.any():
        p = int(np.argmax(bad))
        k = int(np.searchsorted(np.cumsum(lengths), p, side="right"))
        pos = p - int(lengths[:k].sum())
        raise InputError(f"lS_i[{k}][{pos}] = {flat[p]} is out of range for table {k} with "
                         f"{rows[k]} rows")
    return np.ascontiguousarray(dense), np.ascontiguousarray(offsets), indices
