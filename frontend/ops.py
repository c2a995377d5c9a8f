"""Our ops, each stated once, with a plain numpy oracle beside it (FBGEMM's op contract).

Every frontend, converter, kernel and test takes these facts from here; the kernels
(``dlrmc.schedules``) implement them fast and are tested against the oracles below, which are
deliberately simple rather than fast.

**Embedding bags** (PyTorch's ``aten._embedding_bag``; table-batched as FBGEMM's TBE, one
kernel for all tables):

- ``weight`` [V, D] float32 (or row-wise quantised uint8 rows, FBGEMM's fused layout:
  ``dlrmc.schedules.embedding_bag.quantize_rows``); ``indices`` [N] int32 or int64, each in
  [0, V) (checked before a row is read: by the CPU kernel in the flat layout, else by
  the runtime); optional
  ``per_sample_weights`` [N] float32 (``Pooling.SUM`` only), scaling each row;
- ``offsets``: the start of each bag, [B] (bag b ends where b+1 starts, the last at N), or
  [B+1] with ``include_last_offset``; table-batched, one row of a [T, B] start-offset matrix
  (the reference's ``lS_o``);
- ``Pooling``: ``SUM``, ``MEAN``, ``MAX`` (ATen's mode numbers 0, 1, 2);
- the **flat layout** (FBGEMM's table-batched bags, TorchRec's KeyedJaggedTensor with its
  lengths summed up; the artifact's own input): one ``indices`` [N] holding every table's
  indices, table-major, and ``offsets`` [T*B+1], bag b of table t spanning
  ``indices[offsets[t*B + b]:offsets[t*B + b + 1]]``, ``offsets[0] = 0`` and
  ``offsets[T*B] = N``; a weighted table's pooling weights are then per row, V_t [rows],
  the weight of an index its row's (the reference's ``v_W_l``). ``flat_layout`` and
  ``reference_layout`` convert to and from the reference's (``lS_o`` [T, B], ``lS_i``);
  the CPU kernel checks a flat batch itself before reading a row and refuses a bad one
  with a ValueError whose message holds ``BAD_FLAT_INPUT``;
- entries equal to ``padding_idx`` are skipped and not counted (by ``MEAN`` either);
- an empty bag (or one of padding only) pools to 0 in every mode: the mean of nothing and the
  max of nothing are 0, as in PyTorch.

**Dot interaction** (facebookresearch/dlrm's ``interact_features``): features [B, F, D] (the
bottom MLP's output first, then each table's pooled row) -> the Gram matrix Z = T T^T per
sample -> the pairs (i, j) with j < i (j <= i with ``self_interaction``) in row-major order
(``interaction_pairs``: the reference's ``li``, ``lj``), optionally after features[:, 0]:
[B, D + P] or [B, P], P = ``num_pairs(F, self_interaction)``.

**Dense**: act(x W^T + b), W [N, K] as ``torch.nn.Linear`` stores it, act none, relu or
sigmoid; reduced precision rounds x and W to bf16 / fp16 (``round_to``) and accumulates in
fp32; int8 quantises W per output channel and x per tensor (``dense_int8``).
"""

from __future__ import annotations

import enum

import numpy as np


class Pooling(enum.IntEnum):
    """How a bag's rows are pooled; the values are ATen's ``mode`` numbers."""

    SUM = 0
    MEAN = 1
    MAX = 2

    @classmethod
    def of(cls, mode: "str | int | Pooling") -> "Pooling":
        """From a name ("sum"), an ATen mode number or a Pooling."""
        if isinstance(mode, str):
            try:
                return cls[mode.upper()]
            except KeyError:
                raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}") from None
        return cls(int(mode))

    @property
    def label(self) -> str:
        return self.name.lower()


POOLING_MODES = tuple(p.label for p in Pooling)     # ("sum", "mean", "max")

#: what the CPU bag kernel's ValueError says of a flat batch that would read outside a table
BAD_FLAT_INPUT = "dlrmc: the batch's indices or offsets are out of range"


def num_pairs(num_features: int, self_interaction: bool) -> int:
    """P: the number of interaction entries kept for F features."""
    f = num_features
    return f * (f + 1) // 2 if self_interaction else f * (f - 1) // 2


def interaction_pairs(num_features: int, self_interaction: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each kept entry of T T^T, in the reference's row-major order."""
    extra = 1 if self_interaction else 0
    li = np.array([i for i in range(num_features) for _ in range(i + extra)], np.int64)
    lj = np.array([j for i in range(num_features) for j in range(i + extra)], np.int64)
    return li, lj


def embedding_bag(
    weight: np.ndarray,
    indices: np.ndarray,
    offsets: np.ndarray,
    mode: str = "sum",
    per_sample_weights: np.ndarray | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> np.ndarray:
    """The embedding-bag contract above, for one table."""
    n = len(indices)
    bounds = list(offsets) if include_last_offset else list(offsets) + [n]
    out = np.zeros((len(bounds) - 1, weight.shape[1]), np.float32)
    for b in range(len(bounds) - 1):
        pos = [p for p in range(bounds[b], bounds[b + 1])
               if padding_idx is None or padding_idx < 0 or indices[p] != padding_idx]
        if not pos:
            continue
        rows = weight[indices[pos]].astype(np.float64)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[pos, None]
        out[b] = {Pooling.SUM: rows.sum, Pooling.MEAN: rows.mean,
                  Pooling.MAX: rows.max}[Pooling.of(mode)](0)
    return out


def flat_layout(lS_o, lS_i) -> tuple[np.ndarray, np.ndarray]:
    """The reference layout (``lS_o`` [T, B] start offsets, ``lS_i`` T index arrays) as the
    flat one: (indices [N], offsets [T*B+1]), int64."""
    lS_o = np.asarray(lS_o, np.int64)
    lengths = np.array([len(i) for i in lS_i], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.asarray(i, np.int64) for i in lS_i]) if len(lS_i) else \
        np.zeros(0, np.int64)
    offsets = np.append((lS_o + starts[:-1, None]).ravel(), starts[-1])
    return indices, offsets


def reference_layout(indices, offsets, num_tables: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The flat layout as the reference's: (``lS_o`` [T, B], [T index arrays])."""
    indices, offsets = np.asarray(indices), np.asarray(offsets, np.int64)
    batch = (len(offsets) - 1) // num_tables
    starts = offsets[::batch] if batch else np.zeros(num_tables + 1, np.int64)
    lS_o = offsets[:-1].reshape(num_tables, batch) - starts[:-1, None]
    return lS_o, np.split(indices, starts[1:-1])


def embedding_bags_flat(weights, indices, offsets, mode: str = "sum",
                        row_weights=None) -> list[np.ndarray]:
    """Every table's bags from the flat layout: one [B, D_t] array per table."""
    lS_o, lS_i = reference_layout(indices, offsets, len(weights))
    return [embedding_bag(w, i, o, mode, None if row_weights is None else row_weights[t][i])
            for t, (w, i, o) in enumerate(zip(weights, lS_i, lS_o))]


def dot_interaction(
    features: np.ndarray, self_interaction: bool = False, prepend_dense: bool = True
) -> np.ndarray:
    """features [B, F, D] -> [B, D + P] (``prepend_dense``: features[:, 0] first) or [B, P]."""
    z = np.einsum("bid,bjd->bij", features.astype(np.float64), features.astype(np.float64))
    li, lj = interaction_pairs(features.shape[1], self_interaction)
    flat = z[:, li, lj].astype(np.float32)
    return np.concatenate([features[:, 0, :], flat], axis=1) if prepend_dense else flat


def dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, act: str = "none") -> np.ndarray:
    """The dense contract above."""
    y = x.astype(np.float64) @ weight.astype(np.float64).T
    if bias is not None:
        y = y + bias
    if act == "relu":
        y = np.maximum(y, 0)
    elif act == "sigmoid":
        y = 1 / (1 + np.exp(-y))
    return y.astype(np.float32)


def round_to(x: np.ndarray, kind: str) -> np.ndarray:
    """float32 values rounded to bf16 / fp16 (to nearest even), as float32; fp32 unchanged."""
    x = np.ascontiguousarray(x, np.float32)
    if kind == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if kind == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.astype(np.uint32).view(np.float32)
    return x


def dense_int8(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, act: str,
               x_scale: float, x_zero: int) -> np.ndarray:
    """``dense`` with x quantised to uint8 (``x_scale``, ``x_zero``) and the weights to int8
    per output channel; see ``dlrmc.schedules.dense_lowp``."""
    f32 = np.float32        # the contract's steps are float32 operations, rounded to even
    weight, x = weight.astype(f32), x.astype(f32)
    w_scale = np.maximum(np.abs(weight).max(axis=1), f32(1e-30)) / f32(127)
    wq = np.clip(np.rint(weight / w_scale[:, None]), -127, 127)
    xq = np.clip(np.rint(x * f32(1.0 / x_scale)) + f32(x_zero), 0, 255)
    deq_x = (xq - x_zero) * x_scale
    return dense(deq_x, wq * w_scale[:, None], bias, act)
