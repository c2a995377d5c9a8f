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


def slice_batch(dense: np.ndarray, offsets: np.ndarray, indices: list[np.ndarray],
                start: int, rows: int, size: int) -> tuple:
    """Rows ``start:start+rows`` of a validated batch as a batch of ``size`` >= ``rows`` rows
    (the extra rows: zero features, empty bags). Offsets are rebased to the piece's indices."""
    end = start + rows
    total = offsets.shape[1]
    dense_piece = np.zeros((size, dense.shape[1]), dense.dtype)
    dense_piece[:rows] = dense[start:end]
    off_piece = np.empty((offsets.shape[0], size), offsets.dtype)
    idx_pieces = []
    for t, idx in enumerate(indices):
        lo = int(offsets[t, start])
        hi = int(offsets[t, end]) if end < total else len(idx)
        off_piece[t, :rows] = offsets[t, start:end] - lo
        off_piece[t, rows:] = hi - lo
        idx_pieces.append(idx[lo:hi])
    return dense_piece, off_piece, idx_pieces
