"""Plain numpy implementations of our ops: the oracles every kernel's tests compare against.

Each function follows the written contract in the docstring of its kernel's module
(``embedding_bag``, ``interaction``) and is deliberately simple rather than fast.
"""

from __future__ import annotations

import numpy as np


def embedding_bag(
    weight: np.ndarray,
    indices: np.ndarray,
    offsets: np.ndarray,
    mode: str = "sum",
    per_sample_weights: np.ndarray | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> np.ndarray:
    """Pool rows of ``weight`` per bag; see ``dlrmc.schedules.embedding_bag``."""
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
        if mode == "sum":
            out[b] = rows.sum(0)
        elif mode == "mean":
            out[b] = rows.mean(0)
        elif mode == "max":
            out[b] = rows.max(0)
        else:
            raise ValueError(mode)
    return out


def interaction_pairs(num_features: int, self_interaction: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each kept entry of T.T^T, in the reference's row-major order."""
    extra = 1 if self_interaction else 0
    li = np.array([i for i in range(num_features) for _ in range(i + extra)], np.int64)
    lj = np.array([j for i in range(num_features) for j in range(i + extra)], np.int64)
    return li, lj


def dot_interaction(
    features: np.ndarray, self_interaction: bool = False, prepend_dense: bool = True
) -> np.ndarray:
    """features [B, F, D] -> [B, D + P] (``prepend_dense``: features[:, 0] first) or [B, P]."""
    z = np.einsum("bid,bjd->bij", features.astype(np.float64), features.astype(np.float64))
    li, lj = interaction_pairs(features.shape[1], self_interaction)
    flat = z[:, li, lj].astype(np.float32)
    return np.concatenate([features[:, 0, :], flat], axis=1) if prepend_dense else flat


def dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, act: str = "none") -> np.ndarray:
    """act(x @ weight^T + bias); see ``dlrmc.schedules.dense``."""
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
