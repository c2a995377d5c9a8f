"""Dense layers: y = act(x @ W^T + b) as one register-blocked kernel, and its weight packing.

Contract: ``x`` [M, K] float32 (M symbolic), ``W`` [N, K] (torch's Linear layout), ``b`` [N],
``act`` "none" | "relu" | "sigmoid"; ``y`` [M, N].

Layout: ``pack_kernel`` turns W into panels ``Wp`` [ceil(N/NR), K, NR] (zero-padded), once,
at load time: ``main`` only ever sees packed weights (Relax's LiftTransformParams moves the
packing into the artifact's ``transform_params`` function).

Schedule: an MR x NR micro-tile of y lives in registers while k runs (MR broadcasts of x and
NR/lanes panel loads feed MR*NR/lanes FMAs); bias and activation are applied before the one
store. Full row tiles are split over the cores; the M % MR remaining rows run a 1 x G*NR
kernel (G panels at once, for independent FMA chains). MR and NR come from
``dlrmc.targets.knobs``.
"""

from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from .work_rule import RULE

ACTIVATIONS = ("none", "relu", "sigmoid")
SYMBOLIC_ROWS = 16   # the rows a call of the any-batch entry is assumed to have


def _epilogue(act: str):
    if act == "relu":
        return lambda v: T.max(v, T.float32(0))
    if act == "sigmoid":
        return lambda v: T.sigmoid(v)
    return lambda v: v


@functools.lru_cache(maxsize=None)
def pack_kernel(n: int, k: int, nr: int):
    """W [N, K] -> Wp [ceil(N/NR), K, NR], zero where N is padded."""
    N, K, NR = int(n), int(k), int(nr)
    NB = (N + NR - 1) // NR

    @T.prim_func(private=True, s_tir=True)
    def pack(w: T.handle, p: T.handle):
        W = T.match_buffer(w, (N, K), "float32")
        P = T.match_buffer(p, (NB, K, NR), "float32")
        for nb, kk, j in T.grid(NB, K, NR):
            with T.sblock("pack"):
                vb, vk, vj = T.axis.remap("SSS", [nb, kk, j])
                P[vb, vk, vj] = T.if_then_else(vb * NR + vj < N, W[T.min(vb * NR + vj, N - 1), vk],
                                               T.float32(0))

    return pack


def row_loops(n: int, k: int, batch: int | None, parallel_min_macs: int):
    """How a dense kernel's work loops run: (M, static, parallel, loop, block annotations).

    Parallel when the call's multiply-adds, M*N*K, reach ``parallel_min_macs`` (the target's
    knob, ``dlrmc.targets.knobs``), M being ``SYMBOLIC_ROWS`` for the any-batch entry. With a
    static M the loops are serial blocks that the ``dlrmc_work`` schedule splits and
    parallelises (or tunes)."""
    static = batch is not None
    M = tvm.tirx.Var("M", "int64") if batch is None else int(batch)
    parallel = (int(batch) if static else SYMBOLIC_ROWS) * n * k >= parallel_min_macs
    loop = T.serial if static or not parallel else T.parallel
    return M, static, parallel, loop, {"schedule_rule": RULE} if static and parallel else {}


@functools.lru_cache(maxsize=None)
def dense_kernel(n: int, k: int, act: str = "none", mr: int = 6, nr: int = 32,
                 parallel_min_macs: int = 0, batch: int | None = None):
    """The packed dense kernel (x, Wp, b, y) for one layer shape; M symbolic unless ``batch``.

    ``act="cross"``: a DCN cross layer's second GEMM with the layer in its epilogue, kernel
    (x, Wp, b, x0, xl, y) and y = x0 * (x @ W^T + b) + xl (x0, xl [M, N]).
    With a static M the row-tile loops are serial blocks for the ``dlrmc_work`` schedule.
    """
    if act not in ACTIVATIONS + ("cross",):
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS} or 'cross'")
    N, K, MR, NR = int(n), int(k), int(mr), int(nr)
    NB = (N + NR - 1) // NR
    G = next(g for g in (4, 2, 1) if NB % g == 0)
    ragged = N % NR != 0
    cross = act == "cross"
    epi = _epilogue(act)
    M, static, parallel, loop, tuned = row_loops(N, K, batch, parallel_min_macs)
    tail_loop = T.serial if static else T.parallel
    tail_tuned = tuned if static and int(batch) % MR > 1 else {}

    @T.macro
    def store(C, X0, XL, r, c, v):
        if cross:
            C[r, c] = X0[r, c] * v + XL[r, c]
        else:
            C[r, c] = epi(v)

    @T.macro
    def tail(A, W, Bv, C, X0, XL, M, vt):
        row = T.sblock_alloc_buffer((G, NR), "float32")
        for g in T.unroll(G):
            for j in T.vectorized(NR):
                row[g, j] = T.float32(0)
        for kk in range(K):
            for g in T.unroll(G):
                for j in T.vectorized(NR):
                    row[g, j] = row[g, j] + A[M // MR * MR + vt // (NB // G), kk] * W[
                        vt % (NB // G) * G + g, kk, j]
        for g in T.unroll(G):
            for j in T.vectorized(NR):
                if (not ragged) or (vt % (NB // G) * G + g) * NR + j < N:
                    store(C, X0, XL, M // MR * MR + vt // (NB // G),
                          (vt % (NB // G) * G + g) * NR + j,
                          row[g, j] + Bv[(vt % (NB // G) * G + g) * NR + j])

    @T.macro
    def access(A, W, Bv, C, X0, XL, M):
        if cross:
            T.reads(A[0:M, 0:K], W[0:NB, 0:K, 0:NR], Bv[0:N], X0[0:M, 0:N], XL[0:M, 0:N])
        else:
            T.reads(A[0:M, 0:K], W[0:NB, 0:K, 0:NR], Bv[0:N])
        T.writes(C[0:M, 0:N])

    @T.macro
    def body(A, W, Bv, C, X0, XL, M):
        if M >= MR:  # an empty parallel loop would still wake the thread pool
            for tile in loop(M // MR * NB):
                with T.sblock("tile"):
                    vt = T.axis.spatial(M // MR * NB, tile)
                    T.sblock_attr(tuned)
                    access(A, W, Bv, C, X0, XL, M)
                    acc = T.sblock_alloc_buffer((MR, NR), "float32")
                    for i in T.unroll(MR):
                        for j in T.vectorized(NR):
                            acc[i, j] = T.float32(0)
                    for kk in range(K):
                        for i in T.unroll(MR):
                            for j in T.vectorized(NR):
                                acc[i, j] = acc[i, j] + A[vt // NB * MR + i, kk] * W[vt % NB, kk, j]
                    for i in T.unroll(MR):
                        for j in T.vectorized(NR):
                            if (not ragged) or vt % NB * NR + j < N:
                                store(C, X0, XL, vt // NB * MR + i, vt % NB * NR + j,
                                      acc[i, j] + Bv[vt % NB * NR + j])

        # The M % MR left-over rows (all of them at batch < MR): one row against G panels at a
        # time, so 2G independent FMA chains hide the FMA latency over the K loop. A single
        # row is not worth waking the thread pool for.
        if parallel and M % MR > 1:
            for tile in tail_loop(M % MR * (NB // G)):
                with T.sblock("tail"):
                    vt = T.axis.spatial(M % MR * (NB // G), tile)
                    T.sblock_attr(tail_tuned)
                    access(A, W, Bv, C, X0, XL, M)
                    tail(A, W, Bv, C, X0, XL, M, vt)
        else:
            for tile in range(M % MR * (NB // G)):
                with T.sblock("tail_serial"):
                    vt = T.axis.spatial(M % MR * (NB // G), tile)
                    access(A, W, Bv, C, X0, XL, M)
                    tail(A, W, Bv, C, X0, XL, M, vt)

    if cross:
        @T.prim_func(private=True, s_tir=True)
        def dense_cross(a: T.handle, w: T.handle, bias: T.handle, x0: T.handle, xl: T.handle,
                        c: T.handle):
            A = T.match_buffer(a, (M, K), "float32")
            W = T.match_buffer(w, (NB, K, NR), "float32")
            Bv = T.match_buffer(bias, (N,), "float32")
            X0 = T.match_buffer(x0, (M, N), "float32")
            XL = T.match_buffer(xl, (M, N), "float32")
            C = T.match_buffer(c, (M, N), "float32")
            body(A, W, Bv, C, X0, XL, M)

        return dense_cross

    @T.prim_func(private=True, s_tir=True)
    def dense(a: T.handle, w: T.handle, bias: T.handle, c: T.handle):
        A = T.match_buffer(a, (M, K), "float32")
        W = T.match_buffer(w, (NB, K, NR), "float32")
        Bv = T.match_buffer(bias, (N,), "float32")
        C = T.match_buffer(c, (M, N), "float32")
        body(A, W, Bv, C, None, None, M)

    return dense
