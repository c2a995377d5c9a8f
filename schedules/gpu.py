"""GPU kernels: table-batched embedding bags and the dot interaction, for CUDA targets.

Same contracts as the CPU kernels (``embedding_bag``, ``interaction``; numpy oracles in
``reference``), different schedules:

- Embedding bags: a sub-warp of ``TPB`` threads per bag (D/4 threads at float4 width when D
  divides by 4, so 4 threads a bag at D = 16 and 8 bags a warp), each thread owning VEC
  consecutive values of the row: every row read is one coalesced, vectorised load across
  the sub-warp. All tables' bags are one grid, ``BLOCK`` threads a block; the table a bag
  belongs to is uniform across its sub-warp.
- Interaction: the features stacked as [B, F, D]; one thread per output element (sample,
  column): the first D columns copy x, column D + p computes the pair (i, j) of entry p
  (row-major strictly-lower, or with the diagonal) in closed form and its D-long dot.

``bind=False`` builds the same loops serially, so the indexing is tested on the CPU against
the oracles where no GPU exists.
"""

from __future__ import annotations

import functools

from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from .dense_lowp import round_to
from .embedding_bag import (BagArgs, bag_result, bag_start, bag_step, bag_tables,
                            check_bag_config, unless_padding)
from .interaction import output_width

BLOCK = 128
SCHEDULED = {"tirx.is_scheduled": True,   # dlight leaves these alone
             "op_pattern": 8}             # opaque to Relax fusion (kOpaque)


def _loop(bind: bool, extent, thread: str):
    return T.thread_binding(extent, thread=thread) if bind else T.serial(extent)


@functools.lru_cache(maxsize=None)
def embedding_bags_gpu_kernel(dim: int, mode: str = "sum", weighted: bool = False,
                              index_dtype: str = "int64", include_last_offset: bool = False,
                              padding_idx: int | None = None,
                              offset_rows: tuple[int, ...] | None = None,
                              batch: int | None = None, bind: bool = True,
                              flat_tables: int | None = None):
    """Arguments as ``BagArgs`` says, as ``embedding_bags_kernel``."""
    check_bag_config(mode, weighted, offset_rows, include_last_offset, flat_tables)
    D = int(dim)
    tables = bag_tables(offset_rows, flat_tables)
    vec = 4 if D % 4 == 0 and D // 4 <= 32 else 1
    tpb = min(32, D // vec)                       # threads per bag
    chunks = -(-D // (tpb * vec))                  # vectors per thread
    bags_per_block = max(BLOCK // tpb, 1)
    pad = int(padding_idx) if padding_idx is not None and padding_idx >= 0 else None
    with IRBuilder() as ib:
        with T.prim_func(private=True, s_tir=True):
            T.func_name("embedding_bags_gpu")
            T.func_attr(SCHEDULED)
            args = BagArgs(tables, D, weighted, index_dtype, offset_rows, include_last_offset,
                           batch, D, flat=flat_tables is not None)
            B, W, R = args.B, args.W, args.R

            def pool(j, b, lane):
                begin, end = args.bounds(j, b)
                acc = T.alloc_buffer((chunks * vec,), "float32", scope="local")
                cnt = T.alloc_buffer((1,), "int64", scope="local")
                with T.serial(chunks * vec) as v:
                    T.buffer_store(acc, bag_start(mode), [v])
                T.buffer_store(cnt, T.int64(0), [0])
                with T.serial(end - begin) as p:
                    row = T.Cast("int64", args.index(j, begin + p))

                    def accumulate():
                        T.buffer_store(cnt, cnt[0] + T.int64(1), [0])
                        with T.serial(chunks) as c:
                            base = (c * tpb + lane) * vec
                            with T.If(base < D):
                                with T.Then():
                                    with T.vectorized(vec) as v:
                                        T.buffer_store(acc, bag_step(
                                            mode, acc[c * vec + v], W[j][row, base + v],
                                            args.weight(j, begin + p, row) if weighted
                                            else None),
                                            [c * vec + v])

                    unless_padding(row, pad, accumulate)
                with T.serial(chunks) as c:
                    base = (c * tpb + lane) * vec
                    with T.If(base < D):
                        with T.Then():
                            with T.vectorized(vec) as v:
                                T.buffer_store(R[j], bag_result(mode, acc[c * vec + v], cnt[0]),
                                               [b, base + v])

            total = B * tables
            with T.sblock("root"):   # Relax's op-pattern analysis expects a root block
                with _loop(bind, (total + bags_per_block - 1) // bags_per_block,
                           "blockIdx.x") as bx:
                    with _loop(bind, bags_per_block * tpb, "threadIdx.x") as tx:
                        g = bx * bags_per_block + tx // tpb
                        with T.If(g < total):
                            with T.Then():
                                for j in range(tables):
                                    with T.If(g // B == j):
                                        with T.Then():
                                            pool(j, g % B, tx % tpb)
    return ib.get()


@functools.lru_cache(maxsize=None)
def dot_interaction_gpu_kernel(num_features: int, dim: int, self_interaction: bool = False,
                               prepend_dense: bool = True, batch: int | None = None,
                               precision: str = "fp32", bind: bool = True):
    """(features [B, F, D], out [B, (D +) P]), as ``dot_interaction_kernel(stacked=True)``."""
    F, D = int(num_features), int(dim)
    e = 1 if self_interaction else 0
    lead = D if prepend_dense else 0
    width = output_width(F, D, self_interaction, prepend_dense)
    with IRBuilder() as ib:
        with T.prim_func(private=True, s_tir=True):
            T.func_name("dot_interaction_gpu")
            T.func_attr(SCHEDULED)
            h_f, h_o = T.arg("features", T.handle()), T.arg("out", T.handle())
            B = T.int64() if batch is None else T.int64(batch)
            X = T.match_buffer(h_f, (B, F, D), "float32")
            out = T.match_buffer(h_o, (B, width), "float32")
            total = B * width
            with T.sblock("root"):
                with _loop(bind, (total + BLOCK - 1) // BLOCK, "blockIdx.x") as bx:
                    with _loop(bind, BLOCK, "threadIdx.x") as tx:
                        g = bx * BLOCK + tx
                        with T.If(g < total):
                            with T.Then():
                                b, col = g // width, g % width
                                p = col - lead
                                # entry p = i (i - 1 + 2e) / 2 + j: i from the quadratic formula in
                                # float, then corrected by one step either way
                                root = T.sqrt(T.Cast("float64", 8 * p + 1))
                                i0 = T.Cast("int64", T.floor((root + (1 - 2 * e)) / 2))
                                i1 = T.if_then_else(i0 * (i0 - 1 + 2 * e) // 2 > p, i0 - 1, i0)
                                i = T.if_then_else((i1 + 1) * (i1 + 2 * e) // 2 <= p, i1 + 1, i1)
                                j = p - i * (i - 1 + 2 * e) // 2
                                acc = T.alloc_buffer((1,), "float32", scope="local")
                                T.buffer_store(acc, T.float32(0), [0])
                                with T.If(col >= lead):
                                    with T.Then():
                                        with T.serial(D) as d:
                                            T.buffer_store(acc, acc[0] + round_to(
                                                precision, X[b, T.min(i, F - 1), d]) * round_to(
                                                precision, X[b, T.max(T.min(j, F - 1), 0), d]), [0])
                                        T.buffer_store(out, acc[0], [b, col])
                                    with T.Else():
                                        T.buffer_store(out, X[b, 0, T.min(col, D - 1)], [b, col])
    return ib.get()
