"""The embedding-bag kernel: one bag of rows of one table, pooled into one output row.

Contract (the same as PyTorch's ``aten._embedding_bag``, which is what it replaces):

- ``weight`` [V, D] float32, ``indices`` [N] int32/int64, ``offsets`` [B] start offsets
  (or [B+1] with ``include_last_offset``), optional ``per_sample_weights`` [N] float32.
- Bag ``b`` pools rows ``indices[offsets[b]:offsets[b+1]]`` (the last bag ends at N).
- ``mode`` "sum" (optionally weighted), "mean" or "max". An empty bag gives zeros in every
  mode. Entries equal to ``padding_idx`` are skipped and not counted.
- Indices and offsets are trusted here: the runtime validates them before native code runs.

Schedule: bags are split over the cores in chunks when the batch is large enough to pay for
waking the thread pool; each bag accumulates in a vector of D lanes.

The numpy oracle for this contract is ``dlrmc.schedules.reference.embedding_bag``.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

MODES = ("sum", "mean", "max")
PARALLEL_MIN_BATCH = 256
CHUNK = 64          # bags per parallel work item


@functools.lru_cache(maxsize=None)
def embedding_bag_kernel(
    dim: int,
    mode: str = "sum",
    weighted: bool = False,
    index_dtype: str = "int64",
    include_last_offset: bool = False,
    padding_idx: int | None = None,
):
    """Return a schedulable TIR PrimFunc for one embedding-bag configuration.

    Its parameters are (weight, indices, offsets[, per_sample_weights], out); V, N and B are
    symbolic, so one function serves every table of the same width and any batch.
    """
    if mode not in MODES:
        raise ValueError(f"embedding bag mode {mode!r} is not one of {MODES}")
    if weighted and mode != "sum":
        raise ValueError("per_sample_weights are only defined for mode='sum'")
    D = int(dim)
    is_max = mode == "max"
    is_mean = mode == "mean"
    counted = is_max or is_mean
    has_pad = padding_idx is not None and padding_idx >= 0
    pad = int(padding_idx) if has_pad else -1
    last = bool(include_last_offset)
    extra = 1 if last else 0
    init = T.float32(-3.4028234663852886e38) if is_max else T.float32(0)

    @T.macro
    def bags(W, idx, off, psw, out, first, count, B, N):
        # Scratch allocated once per work item: inside a parallel loop TVM heap-allocates it.
        acc = T.sblock_alloc_buffer((D,), "float32", scope="global")
        cnt = T.sblock_alloc_buffer((1,), "int64", scope="global")
        for s in range(count):
            vb = first + s
            for d in T.vectorized(D):
                acc[d] = init
            cnt[0] = T.int64(0)
            begin = T.Cast("int64", off[vb])
            if last:
                end = T.Cast("int64", off[vb + 1])
            else:
                end = T.if_then_else(vb + 1 < B, T.Cast("int64", off[T.min(vb + 1, B - 1)]), N)
            for j in range(end - begin):
                row = T.Cast("int64", idx[begin + j])
                if (not has_pad) or row != pad:
                    if counted:
                        cnt[0] = cnt[0] + T.int64(1)
                    for d in T.vectorized(D):
                        if is_max:
                            acc[d] = T.max(acc[d], W[row, d])
                        elif weighted:
                            acc[d] = acc[d] + W[row, d] * psw[begin + j]
                        else:
                            acc[d] = acc[d] + W[row, d]
            for d in T.vectorized(D):
                if is_mean:
                    out[vb, d] = T.if_then_else(
                        cnt[0] > T.int64(0), acc[d] / T.Cast("float32", cnt[0]), T.float32(0))
                elif is_max:
                    out[vb, d] = T.if_then_else(cnt[0] > T.int64(0), acc[d], T.float32(0))
                else:
                    out[vb, d] = acc[d]

    @T.macro
    def pool(W, idx, off, psw, out, B, N):
        # The thread pool is woken only when the batch is worth it.
        if B >= PARALLEL_MIN_BATCH:
            for c in T.parallel((B + CHUNK - 1) // CHUNK):
                with T.sblock("bags"):
                    vc = T.axis.spatial((B + CHUNK - 1) // CHUNK, c)
                    T.reads(W[0:W.shape[0], 0:D], idx[0:N], off[0:B + extra])
                    T.writes(out[0:B, 0:D])
                    bags(W, idx, off, psw, out, vc * CHUNK, T.min(CHUNK, B - vc * CHUNK), B, N)
        else:
            with T.sblock("bags_serial"):
                T.reads(W[0:W.shape[0], 0:D], idx[0:N], off[0:B + extra])
                T.writes(out[0:B, 0:D])
                bags(W, idx, off, psw, out, T.int64(0), B, B, N)

    if weighted:

        @T.prim_func(private=True, s_tir=True)
        def kernel(w: T.handle, i: T.handle, o: T.handle, s: T.handle, r: T.handle):
            V, N, B = T.int64(), T.int64(), T.int64()
            W = T.match_buffer(w, (V, D), "float32")
            idx = T.match_buffer(i, (N,), index_dtype)
            off = T.match_buffer(o, (B + extra,), index_dtype)
            psw = T.match_buffer(s, (N,), "float32")
            out = T.match_buffer(r, (B, D), "float32")
            pool(W, idx, off, psw, out, B, N)

    else:

        @T.prim_func(private=True, s_tir=True)
        def kernel(w: T.handle, i: T.handle, o: T.handle, r: T.handle):
            V, N, B = T.int64(), T.int64(), T.int64()
            W = T.match_buffer(w, (V, D), "float32")
            idx = T.match_buffer(i, (N,), index_dtype)
            off = T.match_buffer(o, (B + extra,), index_dtype)
            out = T.match_buffer(r, (B, D), "float32")
            pool(W, idx, off, None, out, B, N)

    return kernel
