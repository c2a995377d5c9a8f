"""The fused dot interaction: DLRM's T.T^T, its lower triangle, and the concat with x.

Contract: T = [x, e_1, .., e_{F-1}] per sample, given either as F tensors [B, D] (what the
model concatenates; reading them in place saves the concat), as one [B, F, D] tensor, or
(``tables``) as x [B, D] and the embedding kernel's one output [F-1, B, D].
The output lists the dot products of the pairs (i, j) with j < i (j <= i with
``self_interaction``) in row-major order: (1,0), (2,0), (2,1), ... When ``prepend_dense``
is set the row starts with x = T[:, 0, :], so it is the reference's ``R = cat([x, Zflat])``
and has D + P columns; otherwise P.

Schedule: samples are split over the cores in chunks (one thread below a batch of
``PARALLEL_MIN_BATCH``). Per sample, T is transposed into a [D, F'] scratch (F' = F rounded up
to the vector width; in float32 lanes x lanes blocks at a time, by shuffles in registers: at
D=64 element by element it took three quarters of the kernel's time), so row i of T.T^T is D
vector FMAs, accumulated in registers, over the
vectors that hold its first i (i+1) columns, and those vectors are stored straight into the
output row: no Gram matrix, no concat. The rows are unrolled (F is static), so every
accumulator and output place is a constant.

The kernel has one buffer per feature, so it is built with TVM's IR builder rather than
TVMScript. The contract and the numpy oracle: ``dlrmc.frontend.ops``.
"""

from __future__ import annotations

import functools

import tvm
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from ..frontend.ops import num_pairs
from .dense_lowp import round_to
from .work_rule import split_work

CHUNK = 16          # samples per work item
PARALLEL_MIN_BATCH = 64
GROUP = 4           # triangle rows computed together, at most
STACK_BYTES = 1024  # TVM puts a scratch buffer below this size on the stack, else the heap


def row_vectors(i: int, extra: int, lanes: int) -> int:
    """The vectors holding row i's triangle entries, columns j < i + extra."""
    return -(-(i + extra) // lanes)


def row_groups(num_features: int, extra: int, lanes: int) -> list[list[int]]:
    """The triangle's rows in groups computed together: up to ``GROUP`` consecutive rows
    whose accumulators (each row as many vectors as its last member needs) fit on the stack,
    so LLVM keeps them in registers."""
    groups: list[list[int]] = []
    for i in range(1 - extra, num_features):
        if groups and len(groups[-1]) < GROUP and (
                (len(groups[-1]) + 1) * row_vectors(i, extra, lanes) * lanes * 4 < STACK_BYTES):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def output_width(num_features: int, dim: int, self_interaction: bool, prepend_dense: bool) -> int:
    return num_pairs(num_features, self_interaction) + (dim if prepend_dense else 0)


@functools.lru_cache(maxsize=None)
def dot_interaction_kernel(num_features: int, dim: int, self_interaction: bool = False,
                           prepend_dense: bool = True, lanes: int = 16, stacked: bool = False,
                           batch: int | None = None, precision: str = "fp32",
                           tables: bool = False):
    """A TIR PrimFunc (f_0, .., f_{F-1}, out), or (features [B, F, D], out) when ``stacked``,
    or (x [B, D], embeddings [F-1, B, D], out) with ``tables``.

    B is symbolic unless ``batch`` is given. ``precision`` bf16/fp16: the features are
    rounded to that type before the fp32 dot products (their products are exact in fp32).
    """
    F, D = int(num_features), int(dim)
    FP = -(-F // lanes) * lanes
    extra = 1 if self_interaction else 0
    lead = D if prepend_dense else 0
    width = output_width(F, D, self_interaction, prepend_dense)
    pairs = width - lead
    with IRBuilder() as ib:
        with T.prim_func(private=True, s_tir=True):
            T.func_name("dot_interaction")
            handles = [T.arg(f"f{k}", T.handle())
                       for k in range(1 if stacked else 2 if tables else F)]
            result = T.arg("out", T.handle())
            B = T.int64() if batch is None else T.int64(batch)
            if stacked:
                (buf,) = [T.match_buffer(handles[0], (B, F, D), "float32")]
                inputs = [buf]
                feature = lambda k, row, d: buf[row, k, d]  # noqa: E731
            elif tables:
                inputs = [T.match_buffer(handles[0], (B, D), "float32"),
                          T.match_buffer(handles[1], (F - 1, B, D), "float32")]
                feature = lambda k, row, d: (  # noqa: E731
                    inputs[0][row, d] if k == 0 else inputs[1][k - 1, row, d])
            else:
                inputs = [T.match_buffer(h, (B, D), "float32") for h in handles]
                feature = lambda k, row, d: inputs[k][row, d]  # noqa: E731
            out = T.match_buffer(result, (B, width), "float32")
            chunks = (B + CHUNK - 1) // CHUNK

            def samples(vc):
                T.reads(*[b[tuple(slice(0, s) for s in b.shape)] for b in inputs])
                T.writes(out[0:B, 0:width])
                tt = T.sblock_alloc_buffer((D, FP), "float32", scope="global")
                groups = row_groups(F, extra, lanes)
                # one accumulator array per group: small stack arrays, each read and written
                # at constant places only, which LLVM turns into registers
                accs = [T.sblock_alloc_buffer(
                    (len(g), row_vectors(g[-1], extra, lanes) * lanes), "float32") for g in groups]
                with T.grid(FP - F, D) as (f, d):
                    T.buffer_store(tt, T.float32(0), [d, F + f])
                blocked = D // lanes * lanes if precision == "fp32" else 0
                with T.serial(T.min(CHUNK, B - vc * CHUNK)) as s:
                    row = vc * CHUNK + s
                    if blocked:
                        with T.serial(D // lanes) as db:
                            for k0 in range(0, F, lanes):
                                transpose_block(tt, row, k0, db * lanes)
                    for k in range(F):
                        with T.serial(D - blocked) as d:
                            T.buffer_store(tt, round_to(precision, feature(k, row, blocked + d)),
                                           [blocked + d, k])
                    if prepend_dense:
                        with T.vectorized(D) as d:
                            T.buffer_store(out, feature(0, row, d), [row, d])
                    for group, acc in zip(groups, accs):
                        gram_rows(tt, acc, row, group)

            def transpose_block(tt, row, k0, d0):
                """tt[d0:d0+lanes, k0:k0+lanes] = features k0.. (zero past F) at d0..: a
                lanes x lanes block transposed in registers, log2(lanes) rounds of
                interleaving row k with row k + lanes/2 (two-source shuffles), where a
                transpose element by element costs a load and a store each."""
                rows = [T.Bind(feature(k, row, tvm.tirx.Ramp(d0, 1, lanes))) if k < F
                        else tvm.tirx.Broadcast(T.float32(0), lanes)
                        for k in range(k0, k0 + lanes)]
                half = lanes // 2
                for _ in range(lanes.bit_length() - 1):
                    rows = [T.Bind(tvm.tirx.Shuffle([rows[k], rows[k + half]], [
                        tvm.tirx.IntImm("int32", base + i + side * lanes)
                        for i in range(half) for side in (0, 1)]))
                        for k in range(half) for base in (0, half)]
                for j, vec in enumerate(rows):
                    T.buffer_store(tt, vec, [d0 + j, tvm.tirx.Ramp(k0, 1, lanes)])

            def gram_rows(tt, acc, row, group):
                """Rows ``group`` of the triangle, row i's columns j < i + extra: the vectors
                holding them accumulated over d, the rows side by side (independent FMA
                chains sharing each load of tt), then stored. A row whose whole vectors end
                inside the sample's pairs is stored as whole vectors (what spills past its
                end is rewritten by the rows after it); the last rows store their exact
                width."""
                vectors = row_vectors(group[-1], extra, lanes)
                for r in range(len(group)):
                    for v in range(vectors):
                        with T.vectorized(lanes) as j:
                            T.buffer_store(acc, T.float32(0), [r, v * lanes + j])
                with T.serial(D) as d:
                    for r, i in enumerate(group):
                        for v in range(vectors):
                            with T.vectorized(lanes) as j:
                                T.buffer_store(acc, acc[r, v * lanes + j] + tt[d, i] * tt[
                                    d, v * lanes + j], [r, v * lanes + j])
                for r, i in enumerate(group):
                    count, first = i + extra, i * (i - 1 + 2 * extra) // 2
                    whole = row_vectors(i, extra, lanes)
                    if first + whole * lanes > pairs:
                        whole = count // lanes
                    for v in range(whole):
                        with T.vectorized(lanes) as j:
                            T.buffer_store(out, acc[r, v * lanes + j],
                                           [row, lead + first + v * lanes + j])
                    for j in range(whole * lanes, count):
                        T.buffer_store(out, acc[r, j], [row, lead + first + j])

            split_work(chunks, B >= PARALLEL_MIN_BATCH, "chunk", samples)
    return ib.get()
