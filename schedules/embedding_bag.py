"""Embedding bags: rows of a table pooled per bag, for one table or many at once (TBE).

The contract (inputs, layouts, pooling modes, empty bags, padding) is stated once in
``dlrmc.frontend.ops``, beside its numpy oracle. In the flat layout (the artifact's input)
the kernel checks its indices and offsets before reading a row (``check_flat_inputs``); the
per-table layouts trust theirs, which the runtime validates before native code runs.

Table-batched (as FBGEMM's TBE): one kernel pools every table and writes one [B, D] output
per table, or all of them as one [T, B, D] tensor (``one_output``: one allocation and one
argument instead of T, for a consumer that reads the tables in place, as the dot interaction
does), so a batch costs one launch, not one per table. Work items are (table, chunk of
bags); they are split over the cores when there are enough bags to pay for waking the thread
pool. Each bag accumulates in a vector of D lanes.

The kernel has one buffer per table, so it is built with TVM's IR builder.
"""

from __future__ import annotations

import functools

import numpy as np

from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from ..frontend.ops import BAD_FLAT_INPUT, POOLING_MODES
from .work_rule import split_work

QUANTS = ("int8", "int4")
FUSED_EXTRA = 8           # bytes after a quantised row's codes: float32 scale, float32 bias


def code_bytes(dim: int, quant: str) -> int:
    """Bytes of a quantised row's codes: one per value (int8), or two values a byte (int4)."""
    return dim if quant == "int8" else (dim + 1) // 2


def fused_width(dim: int, quant: str) -> int:
    return code_bytes(dim, quant) + FUSED_EXTRA


def check_bag_config(mode: str, weighted: bool, offset_rows, include_last_offset: bool,
                     flat_tables: int | None = None) -> None:
    """A configuration error in an embedding-bag kernel's arguments, as ValueError."""
    if flat_tables is not None and (offset_rows is not None or include_last_offset
                                    or flat_tables < 1):
        raise ValueError("the flat layout (flat_tables) has its own [T*B+1] offsets")
    if mode not in POOLING_MODES:
        raise ValueError(f"embedding bag mode {mode!r} is not one of {POOLING_MODES}")
    if weighted and mode != "sum":
        raise ValueError("per_sample_weights are only defined for mode='sum'")
    if offset_rows is not None and include_last_offset:
        raise ValueError("a shared offset matrix holds start offsets only")


class BagArgs:
    """The table-batched kernel's arguments in the contract's order, declared inside a
    ``T.prim_func`` builder. Shared by the CPU and GPU kernels so both keep one signature:

    - per-table layout: (W_0.., I_0.., offsets, [PSW_0..,] out_0..), offsets 1-D for one
      table or a [T, B] matrix read at ``offset_rows``, PSW per index;
    - flat layout (``flat``, FBGEMM's TBE and the artifact's input): (W_0.., indices [N],
      offsets [T*B+1], [V_0..,] out_0..), bag b of table j spanning
      ``indices[offsets[j*B + b]:offsets[j*B + b + 1]]``; a weighted bag's weights are the
      per-row vectors V_j [rows of table j] read at each index (the reference's ``v_W_l``).

    With ``one_output`` the outputs out_0.. are one tensor ``out`` [T, B, D].
    """

    def __init__(self, tables: int, dim: int, weighted: bool, index_dtype: str,
                 offset_rows: tuple[int, ...] | None, include_last_offset: bool,
                 batch: int | None, weight_cols: int, weight_dtype: str = "float32",
                 flat: bool = False, one_output: bool = False):
        h_w = [T.arg(f"w{j}", T.handle()) for j in range(tables)]
        h_i = [T.arg(f"i{j}", T.handle()) for j in range(1 if flat else tables)]
        h_o = T.arg("offsets", T.handle())
        h_s = [T.arg(f"s{j}", T.handle()) for j in range(tables)] if weighted else []
        h_r = ([T.arg("out", T.handle())] if one_output
               else [T.arg(f"out{j}", T.handle()) for j in range(tables)])
        self.B = B = T.int64() if batch is None else T.int64(batch)
        self.flat = flat
        self.ns = [T.int64()] * tables if flat else [T.int64() for _ in range(tables)]
        self.W = [T.match_buffer(h, (T.int64(), weight_cols), weight_dtype) for h in h_w]
        self.I = [T.match_buffer(h, (n,), index_dtype) for h, n in zip(h_i, self.ns)]
        self.stacked = offset_rows is not None
        self.rows = tuple(offset_rows) if self.stacked else (0,)
        self.last = include_last_offset or flat
        if flat:
            self.O = T.match_buffer(h_o, (tables * B + 1,), index_dtype)
        elif self.stacked:
            self.O = T.match_buffer(h_o, (T.int64(), B), index_dtype)
        else:
            self.O = T.match_buffer(h_o, (B + (1 if include_last_offset else 0),), index_dtype)
        self.S = [T.match_buffer(h, (T.int64() if flat else n,), "float32")
                  for h, n in zip(h_s, self.ns)]
        self.R = ([T.match_buffer(h_r[0], (tables, B, dim), "float32")] if one_output
                  else [T.match_buffer(h, (B, dim), "float32") for h in h_r])
        self.one_output = one_output

    def store(self, j, b, d, value) -> None:
        """Write ``value`` as element ``d`` of table ``j``'s bag ``b``."""
        if self.one_output:
            T.buffer_store(self.R[0], value, [j, b, d])
        else:
            T.buffer_store(self.R[j], value, [b, d])

    def offset(self, j, b):
        if self.flat:
            return T.Cast("int64", self.O[j * self.B + b])
        return T.Cast("int64", self.O[self.rows[j], b] if self.stacked else self.O[b])

    def bounds(self, j, b):
        """(begin, end) of bag ``b`` of table ``j``: the last bag ends at the index count."""
        if self.last:
            return self.offset(j, b), self.offset(j, b + 1)
        return self.offset(j, b), T.if_then_else(
            b + 1 < self.B, self.offset(j, T.min(b + 1, self.B - 1)), self.ns[j])

    def index(self, j, p):
        """Index ``p`` of table ``j``'s indices (``p`` counted in the flat array if flat)."""
        return self.I[0 if self.flat else j][p]

    def weight(self, j, p, row):
        """The pooling weight of index ``p`` (whose value is ``row``) of table ``j``."""
        return self.S[j][row] if self.flat else self.S[j][p]


def bag_tables(offset_rows, flat_tables: int | None) -> int:
    """How many tables an embedding-bag kernel of these arguments pools."""
    if flat_tables is not None:
        return int(flat_tables)
    return len(offset_rows) if offset_rows is not None else 1


def bag_start(mode: str):
    """A bag's accumulator before its first row: the lowest float32 for max, else 0."""
    return T.float32(-3.4028234663852886e38) if mode == "max" else T.float32(0)


def bag_step(mode: str, acc, value, weight=None):
    """The accumulator after one more row ``value`` (times ``weight``, weighted bags)."""
    if mode == "max":
        return T.max(acc, value)
    return acc + (value * weight if weight is not None else value)


def bag_result(mode: str, acc, count):
    """A bag's output from its accumulator and row count: an empty bag gives 0."""
    if mode == "mean":
        return T.if_then_else(count > T.int64(0), acc / T.Cast("float32", count), T.float32(0))
    if mode == "max":
        return T.if_then_else(count > T.int64(0), acc, T.float32(0))
    return acc


def unless_padding(row, pad: int | None, body) -> None:
    """Emit ``body()``, guarded to skip rows equal to ``pad`` when there is one."""
    if pad is None:
        body()
    else:
        with T.If(row != pad):
            with T.Then():
                body()


def check_flat_inputs(args: BagArgs, tables: int) -> None:
    """Emit the flat layout's input checks, before any row is read: offsets start at 0,
    never decrease and end at the index count, and every index lies in its table (compared
    as unsigned, so a negative one fails too). A failure raises ``BAD_FLAT_INPUT`` as a
    ValueError from the call: native code never trusts what the caller passed. Branch-free
    passes over offsets and indices, each followed by one assertion (a few microseconds at
    batch 1, below 0.5% of the model at any batch)."""
    B, O, n = args.B, args.O, args.ns[0]
    bad = T.sblock_alloc_buffer((1,), "int64", scope="global")
    with T.Assert(T.And(args.offset(0, 0) == 0, T.Cast("int64", O[tables * B]) == n),
                  BAD_FLAT_INPUT, "ValueError"):
        pass
    T.buffer_store(bad, T.int64(0), [0])
    with T.serial(tables * B) as q:
        T.buffer_store(bad, bad[0] | T.Cast("int64", O[q] > O[q + 1]), [0])
    with T.Assert(bad[0] == 0, BAD_FLAT_INPUT, "ValueError"):
        pass
    for j in range(tables):       # every offset now lies in [0, n]
        begin = args.offset(j, 0)
        rows = T.Cast("uint64", args.W[j].shape[0])
        with T.serial(args.offset(j + 1, 0) - begin) as p:
            T.buffer_store(bad, bad[0] | T.Cast(
                "int64", T.Cast("uint64", args.index(j, begin + p)) >= rows), [0])
    with T.Assert(bad[0] == 0, BAD_FLAT_INPUT, "ValueError"):
        pass


PARALLEL_MIN_BAGS = 256   # bags (all tables) below which one thread does the work
CHUNK = 64                # bags per work item
# Rows ahead the CPU kernels prefetch, into L2 (prefetcht1): with the hardware alone a core
# keeps too few rows in flight. Kaggle's 26 tables at B=2048, fresh batches, 2 threads: one
# index a bag (dim 16) 0.51 -> 0.11 ms, 20 a bag (dim 64) 9.2 -> 6.5 ms; prefetching into L1
# instead gained 2-13%, the L1's few outstanding misses being the limit.
PREFETCH = 16


@functools.lru_cache(maxsize=None)
def embedding_bags_kernel(
    dim: int,
    mode: str = "sum",
    weighted: bool = False,
    index_dtype: str = "int64",
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    offset_rows: tuple[int, ...] | None = None,
    batch: int | None = None,
    prefetch: int = 0,
    quant: str | None = None,
    flat_tables: int | None = None,
    one_output: bool = False,
):
    """A PrimFunc pooling several tables at once, its arguments as ``BagArgs`` says.

    ``flat_tables``: that many tables in the flat layout. Else ``offset_rows=None``: one
    table with 1-D offsets; otherwise table j reads row ``offset_rows[j]`` of a [T, B]
    offset matrix. V and N are symbolic; B too unless ``batch``.
    ``prefetch`` > 0: while pooling index p, prefetch the row of index p + ``prefetch``
    into L2 (a tuning knob; 0 leaves it to the hardware; the lowering asks for
    ``PREFETCH``). ``quant="int8"`` / ``"int4"``: the tables
    are row-wise quantised in FBGEMM's fused layout (``quantize_rows``), uint8
    [V, ``fused_width``], dequantised here as code * scale + bias. ``one_output``: the
    tables' results as one [T, B, D] tensor (``BagArgs``).
    """
    check_bag_config(mode, weighted, offset_rows, include_last_offset, flat_tables)
    D = int(dim)
    tables = bag_tables(offset_rows, flat_tables)
    counted = mode in ("max", "mean")
    pad = int(padding_idx) if padding_idx is not None and padding_idx >= 0 else None
    with IRBuilder() as ib:
        with T.prim_func(private=True, s_tir=True):
            T.func_name("embedding_bags")
            C = code_bytes(D, quant) if quant is not None else 0
            args = BagArgs(tables, D, weighted, index_dtype, offset_rows, include_last_offset,
                           batch, D if quant is None else C + FUSED_EXTRA,
                           "float32" if quant is None else "uint8", flat_tables is not None,
                           one_output)
            B, ns, W, I, O, S, R = args.B, args.ns, args.W, args.I, args.O, args.S, args.R

            def fused_float(table, row, at):
                """The float32 stored little-endian at bytes ``at``..``at``+3 of a fused row."""
                word = T.Cast("uint32", table[row, at])
                for b in range(1, 4):
                    word = word | (T.Cast("uint32", table[row, at + b]) << T.uint32(8 * b))
                return T.reinterpret("float32", word)

            def value(j, row, d):
                if quant is None:
                    return W[j][row, d]
                if quant == "int8":
                    code = W[j][row, d]
                else:   # value 2i in the low nibble of byte i, 2i+1 in the high one
                    code = (W[j][row, d // 2] >> T.Cast("uint8", (d % 2) * 4)) & T.uint8(15)
                return (T.Cast("float32", code) * fused_float(W[j], row, C)
                        + fused_float(W[j], row, C + 4))

            chunks = (B + CHUNK - 1) // CHUNK

            def pool_table(j, first, count, acc, cnt):
                with T.serial(count) as s:
                    b = first + s
                    with T.vectorized(D) as d:
                        T.buffer_store(acc, bag_start(mode), [d])
                    T.buffer_store(cnt, T.int64(0), [0])
                    begin, end = args.bounds(j, b)
                    with T.serial(end - begin) as p:
                        row = T.Cast("int64", args.index(j, begin + p))
                        if prefetch:
                            ahead = begin + p + prefetch
                            with T.If(ahead < ns[j]):
                                with T.Then():
                                    ahead_row = T.Cast("int64", args.index(
                                        j, T.min(ahead, ns[j] - 1)))
                                    row_bytes = D * 4 if quant is None else fused_width(D,
                                                                                         quant)
                                    for line in range(0, row_bytes, 64):   # cache lines
                                        T.evaluate(T.call_llvm_intrin(
                                            "void", "llvm.prefetch.p0",
                                            T.address_of(W[j][ahead_row, line // (
                                                4 if quant is None else 1)]), T.int32(0),
                                            T.int32(2), T.int32(1)))   # to L2

                        def accumulate():
                            if counted:
                                T.buffer_store(cnt, cnt[0] + T.int64(1), [0])
                            with T.vectorized(D) as d:
                                T.buffer_store(acc, bag_step(
                                    mode, acc[d], value(j, row, d),
                                    args.weight(j, begin + p, row) if weighted else None),
                                    [d])

                        unless_padding(row, pad, accumulate)
                    with T.vectorized(D) as d:
                        args.store(j, b, d, bag_result(mode, acc[d], cnt[0]))

            def work(v):
                T.reads(*[w[0:w.shape[0], 0:D] for w in W], *[i[0:i.shape[0]] for i in I],
                        *[s[0:s.shape[0]] for s in S], O[tuple(slice(0, x) for x in O.shape)])
                T.writes(*[r[tuple(slice(0, n) for n in r.shape)] for r in R])
                # Scratch once per work item: inside a parallel loop TVM heap-allocates it.
                acc = T.sblock_alloc_buffer((D,), "float32", scope="global")
                cnt = T.sblock_alloc_buffer((1,), "int64", scope="global")
                c = v % chunks
                for j in range(tables):
                    with T.If(v // chunks == j):
                        with T.Then():
                            pool_table(j, c * CHUNK, T.min(CHUNK, B - c * CHUNK), acc, cnt)

            if args.flat:
                check_flat_inputs(args, tables)
            split_work(tables * chunks, B * tables >= PARALLEL_MIN_BAGS, "bags", work)
    return ib.get()


def quantize_rows(weight: np.ndarray, quant: str = "int8", chunk: int = 1 << 20) -> np.ndarray:
    """float32 [V, D] -> FBGEMM's fused row-wise layout, uint8 [V, ``fused_width``]: per row
    the codes round((w - min) / scale) with scale = (max - min) / 255 (int8) or / 15 (int4,
    two codes a byte, the even value in the low nibble), then scale and bias (= min) as
    little-endian float32."""
    if quant not in QUANTS:
        raise ValueError(f"quantisation must be one of {QUANTS}, got {quant!r}")
    rows, dim = weight.shape
    levels, c = (255 if quant == "int8" else 15), code_bytes(dim, quant)
    out = np.empty((rows, c + FUSED_EXTRA), np.uint8)
    for start in range(0, rows, chunk):
        w = np.asarray(weight[start:start + chunk], np.float32)
        lo, hi = w.min(axis=1), w.max(axis=1)
        scale = ((hi - lo) / levels).astype(np.float32)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)
        codes = np.clip(np.rint((w - lo[:, None]) / safe[:, None]), 0, levels).astype(np.uint8)
        if quant == "int4":
            if dim % 2:
                codes = np.concatenate([codes, np.zeros((len(codes), 1), np.uint8)], axis=1)
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        fused_rows(codes, scale, lo, out[start:start + chunk])
    return out


def fused_rows(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """Rows already quantised, as the fused layout (``quantize_rows``): ``codes`` uint8 [V,
    ``code_bytes``] (int4 two a byte, the even value in the low nibble) and each row's scale
    and bias (float32 [V]) -> uint8 [V, code bytes + ``FUSED_EXTRA``], written into ``out``
    if given."""
    c = codes.shape[1]
    if out is None:
        out = np.empty((len(codes), c + FUSED_EXTRA), np.uint8)
    out[:, :c] = codes
    out[:, c:c + 4] = np.ascontiguousarray(scale, "<f4").view(np.uint8).reshape(-1, 4)
    out[:, c + 4:] = np.ascontiguousarray(bias, "<f4").view(np.uint8).reshape(-1, 4)
    return out


def dequantize_rows(fused: np.ndarray, dim: int | None = None, quant: str = "int8") -> np.ndarray:
    """The float32 rows [V, dim] a fused table stands for (what the kernel computes with)."""
    c = fused.shape[1] - FUSED_EXTRA
    dim = dim if dim is not None else (c if quant == "int8" else 2 * c)
    codes = fused[:, :c]
    if quant == "int4":
        codes = np.stack([codes & 15, codes >> 4], axis=2).reshape(len(codes), -1)
    scale = np.ascontiguousarray(fused[:, c:c + 4]).view("<f4")
    bias = np.ascontiguousarray(fused[:, c + 4:]).view("<f4")
    return (codes[:, :dim].astype(np.float32) * scale + bias).astype(np.float32)


def embedding_bag_kernel(dim: int, mode: str = "sum", weighted: bool = False,
                         index_dtype: str = "int64", include_last_offset: bool = False,
                         padding_idx: int | None = None):
    """One table: (weight, indices, offsets[, per_sample_weights], out)."""
    return embedding_bags_kernel(dim, mode, weighted, index_dtype, include_last_offset,
                                 padding_idx, None)
