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
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as B

from .work_rule import RULE

ACTIVATIONS = ("none", "relu", "sigmoid")
SYMBOLIC_ROWS = 16   # the rows a call of the any-batch entry is assumed to have
NARROW_ROWS = 8      # rows of a narrow layer computed together: 8 independent FMA chains


def when(cond, body, otherwise=None) -> None:
    """Emit ``body()`` under ``cond``, else ``otherwise()`` if given (IR builder): a Python
    bool decides now, an expression becomes a run-time test."""
    if isinstance(cond, bool):
        if cond:
            body()
        elif otherwise is not None:
            otherwise()
        return
    with B.If(cond):
        with B.Then():
            body()
        if otherwise is not None:
            with B.Else():
                otherwise()


def register_rows(rows: int, width: int, dtype: str) -> list:
    """A micro-tile's accumulators: one small buffer a row (IR builder, inside a block). TVM
    puts a scratch buffer of 1 KB or more on the heap (``kMaxStackAlloca``), where every FMA
    would load and store it (an AVX-512 tile of 8 x 32 floats ran at a third of the speed);
    small stack arrays read and written at constant places LLVM keeps in registers."""
    return [B.sblock_alloc_buffer((width,), dtype) for _ in range(rows)]


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


def row_loops(n: int, k: int, batch: int | None, mr: int, parallel_min_macs: int,
              weight_bytes: int = 0, parallel_min_bytes: int = 0):
    """How a dense kernel's work loops run: (M, static, parallel, loop, block annotations of
    the micro-tiles, block annotations of the left-over rows).

    Parallel when the call's multiply-adds, M*N*K, reach ``parallel_min_macs`` (the target's
    knob, ``dlrmc.targets.knobs``), M being ``SYMBOLIC_ROWS`` for the any-batch entry. With a
    static M the loops are serial blocks that the ``dlrmc_work`` schedule splits and
    parallelises (or tunes). The left-over rows (M % MR) go parallel when there are two or
    more, and, at a static batch under one micro-tile, when the weights (``weight_bytes``)
    reach ``parallel_min_bytes``: such a call streams the whole weight for each row, so its
    time is the weight's bytes, not its FMAs, and split over the cores each core streams
    (and keeps in its L2 from call to call) its share."""
    static = batch is not None
    M = tvm.tirx.Var("M", "int64") if batch is None else int(batch)
    parallel = (int(batch) if static else SYMBOLIC_ROWS) * n * k >= parallel_min_macs
    loop = T.serial if static or not parallel else T.parallel
    tuned = {"schedule_rule": RULE} if static and parallel else {}
    streaming = static and M < mr and 0 < parallel_min_bytes <= weight_bytes
    tail_tuned = {"schedule_rule": RULE} if static and (
        streaming or parallel and M % mr > 1) else {}
    return M, static, parallel, loop, tuned, tail_tuned


@functools.lru_cache(maxsize=None)
def dense_kernel(n: int, k: int, act: str = "none", mr: int = 6, nr: int = 32,
                 parallel_min_macs: int = 0, batch: int | None = None,
                 parallel_min_bytes: int = 0):
    """The packed dense kernel (x, Wp, b, y) for one layer shape; M symbolic unless ``batch``.

    ``act="cross"``: a DCN cross layer's second GEMM with the layer in its epilogue, kernel
    (x, Wp, b, x0, xl, y) and y = x0 * (x @ W^T + b) + xl (x0, xl [M, N]).
    With a static M the row-tile loops are serial blocks for the ``dlrmc_work`` schedule.

    Built with TVM's IR builder: TVMScript's parser spent about 0.1 s a kernel in Python's
    ``inspect`` (its macros look up their caller's frames), seconds of every compile.
    """
    if act not in ACTIVATIONS + ("cross",):
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS} or 'cross'")
    N, K, MR, NR = int(n), int(k), int(mr), int(nr)
    NB = (N + NR - 1) // NR
    G = next(g for g in (4, 2, 1) if NB % g == 0)
    ragged = N % NR != 0
    cross = act == "cross"
    epi = _epilogue(act)
    M, static, parallel, loop, tuned, tail_tuned = row_loops(
        N, K, batch, MR, parallel_min_macs, NB * K * NR * 4, parallel_min_bytes)
    tail_loop = B.serial if static else B.parallel

    with IRBuilder() as ib:
        with B.prim_func(private=True, s_tir=True):
            B.func_name("dense_cross" if cross else "dense")
            names = ("a", "w", "bias", "x0", "xl", "c") if cross else ("a", "w", "bias", "c")
            h = {name: B.arg(name, B.handle()) for name in names}
            A = B.match_buffer(h["a"], (M, K), "float32")
            W = B.match_buffer(h["w"], (NB, K, NR), "float32")
            Bv = B.match_buffer(h["bias"], (N,), "float32")
            X0 = B.match_buffer(h["x0"], (M, N), "float32") if cross else None
            XL = B.match_buffer(h["xl"], (M, N), "float32") if cross else None
            C = B.match_buffer(h["c"], (M, N), "float32")

            def store(r, c_, v):
                B.buffer_store(C, X0[r, c_] * v + XL[r, c_] if cross else epi(v), [r, c_])

            def access():
                if cross:
                    B.reads(A[0:M, 0:K], W[0:NB, 0:K, 0:NR], Bv[0:N], X0[0:M, 0:N],
                            XL[0:M, 0:N])
                else:
                    B.reads(A[0:M, 0:K], W[0:NB, 0:K, 0:NR], Bv[0:N])
                B.writes(C[0:M, 0:N])

            def micro_tile(count, row_of, panel_of):
                """``count`` x NR accumulators in registers, the x-th x's A row
                ``row_of(x)`` against W panel ``panel_of(x)`` over all of K; then bias,
                epilogue and one store."""
                accs = register_rows(count, NR, "float32")
                for acc in accs:
                    with B.vectorized(NR) as j:
                        B.buffer_store(acc, B.float32(0), [j])
                with B.serial(K) as kk:
                    for x, acc in enumerate(accs):
                        with B.vectorized(NR) as j:
                            B.buffer_store(acc, acc[j] + A[row_of(x), kk]
                                           * W[panel_of(x), kk, j], [j])
                for x, acc in enumerate(accs):
                    with B.vectorized(NR) as j:
                        col = panel_of(x) * NR + j
                        when((not ragged) or col < N, lambda: store(
                            row_of(x), col, acc[j] + Bv[col]))

            def tiles():
                with loop(M // MR * NB) as tile:
                    with B.sblock("tile"):
                        vt = B.axis.spatial(M // MR * NB, tile)
                        B.sblock_attr(tuned)
                        access()
                        # MR rows against one panel
                        micro_tile(MR, lambda i: vt // NB * MR + i, lambda i: vt % NB)

            def tails(kind, name, attrs):
                # one row against G panels at a time: 2G independent FMA chains
                with kind(M % MR * (NB // G)) as tile:
                    with B.sblock(name):
                        vt = B.axis.spatial(M % MR * (NB // G), tile)
                        if attrs is not None:
                            B.sblock_attr(attrs)
                        access()
                        micro_tile(G, lambda g: M // MR * MR + vt // (NB // G),
                                   lambda g: vt % (NB // G) * G + g)

            # an empty parallel loop would still wake the thread pool
            when(M >= MR, tiles)
            # The M % MR left-over rows (all of them at batch < MR): one row against G panels
            # at a time, so 2G independent FMA chains hide the FMA latency over the K loop.
            # A single row is not worth waking the thread pool for, unless its weights are
            # large (``row_loops``).
            when(bool(tail_tuned) if static else parallel and M % MR > 1,
                 lambda: tails(tail_loop, "tail", tail_tuned),
                 lambda: tails(B.serial, "tail_serial", None))
    return ib.get()


def narrow(n: int, lanes: int) -> bool:
    """Whether a layer of ``n`` outputs gets ``dense_narrow_kernel``: n at most a quarter of
    a vector (a DLRM's last layer, N = 1), where a panel padded to a vector would waste
    three quarters or more of its FMAs."""
    return 4 * int(n) <= int(lanes)


@functools.lru_cache(maxsize=None)
def dense_narrow_kernel(n: int, k: int, act: str = "none", lanes: int = 16,
                        parallel_min_macs: int = 0, batch: int | None = None):
    """The dense kernel (x, W, b, y) for a layer narrower than a vector (``narrow``), W
    unpacked [N, K]: each y value is a dot product vectorised over K. ``NARROW_ROWS`` rows
    at a time (independent FMA chains sharing each load of W), every vector of K, then the
    lanes of each accumulator summed by halving, bias, epilogue, one store. (The packed
    kernel padded N = 1 to a whole panel: at Kaggle's B=2048 its last layer took 294 us.)"""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS}")
    N, K, L, R = int(n), int(k), int(lanes), NARROW_ROWS
    KV = K // L                      # whole vectors of K; the K % L rest lane by lane
    epi = _epilogue(act)
    M, static, parallel, loop, tuned, _ = row_loops(N, K, batch, R, parallel_min_macs)

    with IRBuilder() as ib:
        with B.prim_func(private=True, s_tir=True):
            B.func_name("dense_narrow")
            h = {name: B.arg(name, B.handle()) for name in ("a", "w", "bias", "c")}
            A = B.match_buffer(h["a"], (M, K), "float32")
            W = B.match_buffer(h["w"], (N, K), "float32")
            Bv = B.match_buffer(h["bias"], (N,), "float32")
            C = B.match_buffer(h["c"], (M, N), "float32")

            def rows(count, row0):
                B.reads(A[0:M, 0:K], W[0:N, 0:K], Bv[0:N])
                B.writes(C[0:M, 0:N])
                for col in range(N):
                    accs = register_rows(count, L, "float32")
                    for acc in accs:
                        with B.vectorized(L) as j:
                            B.buffer_store(acc, B.float32(0), [j])
                    with B.serial(KV) as kv:
                        for r, acc in enumerate(accs):
                            with B.vectorized(L) as j:
                                B.buffer_store(acc, acc[j] + A[row0 + r, kv * L + j]
                                               * W[col, kv * L + j], [j])
                    for r, acc in enumerate(accs):
                        for t in range(K - KV * L):
                            B.buffer_store(acc, acc[t] + A[row0 + r, KV * L + t]
                                           * W[col, KV * L + t], [t])
                        width = L // 2
                        while width:
                            with B.vectorized(width) as j:
                                B.buffer_store(acc, acc[j] + acc[j + width], [j])
                            width //= 2
                        B.buffer_store(C, epi(acc[0] + Bv[col]), [row0 + r, col])

            def blocks():
                with loop(M // R) as blk:
                    with B.sblock("rows"):
                        vb = B.axis.spatial(M // R, blk)
                        B.sblock_attr(tuned)
                        rows(R, vb * R)

            def tail():
                with B.serial(M % R) as t:
                    with B.sblock("row_tail"):
                        vt = B.axis.spatial(M % R, t)
                        rows(1, M // R * R + vt)

            when(M >= R, blocks)
            tail()
    return ib.get()
