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
