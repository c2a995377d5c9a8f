"""The fused dot interaction: DLRM's T.T^T, its lower triangle, and the concat with x.

Contract: ``features`` [B, F, D] float32 holds T = [x, e_1, .., e_{F-1}] per sample.
The output lists the dot products of the pairs (i, j) with j < i (j <= i with
``self_interaction``) in row-major order: (1,0), (2,0), (2,1), ... When ``prepend_dense``
is set the row starts with x = features[:, 0, :], so it is the reference's
``R = cat([x, Zflat])`` and has D + P columns; otherwise P.

The numpy oracle for this contract is ``dlrmc.schedules.reference.dot_interaction``.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T


def num_pairs(num_features: int, self_interaction: bool) -> int:
    """P: the number of interaction entries kept for F features."""
    f = num_features
    return f * (f + 1) // 2 if self_interaction else f * (f - 1) // 2


@functools.lru_cache(maxsize=None)
def dot_interaction_kernel(
    num_features: int, dim: int, self_interaction: bool = False, prepend_dense: bool = True
):
    """Return a schedulable TIR PrimFunc (features, out) for one interaction shape; B symbolic."""
    F, D = int(num_features), int(dim)
    extra = 1 if self_interaction else 0
    lead = D if prepend_dense else 0
    width = lead + num_pairs(F, self_interaction)

    @T.prim_func(private=True, s_tir=True)
    def kernel(t: T.handle, r: T.handle):
        B = T.int64()
        feat = T.match_buffer(t, (B, F, D), "float32")
        out = T.match_buffer(r, (B, width), "float32")
        for b in range(B):
            with T.sblock("interaction"):
                vb = T.axis.spatial(B, b)
                T.reads(feat[vb, 0:F, 0:D])
                T.writes(out[vb, 0:width])
                for d in range(lead):
                    out[vb, d] = feat[vb, 0, d]
                for i in range(F):
                    for j in range(i + extra):
                        col = lead + i * (i - 1 + 2 * extra) // 2 + j
                        out[vb, col] = T.float32(0)
                        for d in range(D):
                            out[vb, col] = out[vb, col] + feat[vb, i, d] * feat[vb, j, d]

    return kernel
