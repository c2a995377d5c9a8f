"""Which compiled entry runs which rows of a batch: bucket choice, padding and splitting.

An artifact holds ``main`` (any batch) and ``main_b{B}`` for each static bucket B. Rows
beyond the largest bucket run in largest-bucket pieces; the rest (or all of a smaller batch)
runs in the smallest bucket that holds it when that pads at most ``MAX_PADDING`` of it
(padding rows are zeros with empty bags, and their outputs are dropped), else in ``main``
at its own size.
"""

from __future__ import annotations

import numpy as np

MAX_PADDING = 0.25


def pick(batch: int, buckets) -> list[tuple[int, int]]:
    """The pieces of a batch: (rows, entry batch), entry batch 0 meaning ``main``."""
    plan = []
    if buckets:
        top = max(buckets)
        while batch > top:
            plan.append((top, top))
            batch -= top
    fits = [b for b in sorted(buckets) if b >= batch]
    if fits and fits[0] - batch <= MAX_PADDING * fits[0]:
        plan.append((batch, fits[0]))
    elif batch:
        plan.append((batch, 0))
    return plan


def slice_batch(dense: np.ndarray, indices: np.ndarray, offsets: np.ndarray,
                start: int, rows: int, size: int) -> tuple:
    """Rows ``start:start+rows`` of a validated batch in the flat layout (``dense`` [B, F],
    ``indices`` [N], ``offsets`` [T*B+1]) as a flat batch of ``size`` >= ``rows`` rows (the
    extra rows: zero features, empty bags), its offsets rebased to its own indices."""
    batch = dense.shape[0]
    tables = (len(offsets) - 1) // batch
    dense_piece = np.zeros((size, dense.shape[1]), dense.dtype)
    dense_piece[:rows] = dense[start:start + rows]
    # Each table's bag bounds for these rows, [T, rows + 1]: where bag b starts, then the end.
    bounds = offsets[np.arange(tables)[:, None] * batch + start + np.arange(rows + 1)]
    lo, hi = bounds[:, 0], bounds[:, -1]
    base = np.concatenate([[0], np.cumsum(hi - lo)]).astype(offsets.dtype)
    off = np.empty((tables, size), offsets.dtype)
    off[:, :rows] = bounds[:, :-1] - lo[:, None] + base[:-1, None]
    off[:, rows:] = base[1:, None]
    idx = np.concatenate([indices[a:b] for a, b in zip(lo, hi)])
    return dense_piece, idx, np.append(off.ravel(), base[-1])


def merge_batches(batches: list[tuple]) -> tuple:
    """Validated flat batches (``dense`` [B_r, F], ``indices``, ``offsets`` [T*B_r+1]) as one
    flat batch of all their rows in order, each table's bags and indices side by side (what
    the server's dynamic batching runs; ``np.split`` of its output at the cumulative row
    counts gives each batch its own rows back)."""
    if len(batches) == 1:
        return batches[0]
    rows = [b[0].shape[0] for b in batches]
    tables = (len(batches[0][2]) - 1) // rows[0]
    dense = np.concatenate([b[0] for b in batches])
    lengths = np.concatenate([np.diff(off).reshape(tables, r)
                              for (_, _, off), r in zip(batches, rows)], axis=1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Segment (batch r, table t) starts where r's table t starts in the concatenated
    # indices; taken table-major, each copied to where the merged layout wants it.
    base = np.cumsum([0] + [len(b[1]) for b in batches[:-1]])
    starts = np.stack([off[::r] + s for (_, _, off), r, s in zip(batches, rows, base)])
    seg_start, seg_len = starts[:, :-1].T.ravel(), np.diff(starts, axis=1).T.ravel()
    out_start = np.cumsum(seg_len) - seg_len
    source = np.repeat(seg_start - out_start, seg_len) + np.arange(int(seg_len.sum()))
    indices = np.concatenate([b[1] for b in batches])[source]
    return dense, indices, offsets
