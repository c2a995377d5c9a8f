"""Dense layers in reduced precision: bf16, fp16 and int8, with fp32 (int32) accumulation.

Contract (as ``dense``): ``x`` [M, K] float32, y = act(x @ W^T + b) [M, N] float32. Relax
tensors between layers stay float32; the kernel rounds its input and its weights:

- ``bf16`` / ``fp16``: x and W rounded to that type (round to nearest even), products
  summed in fp32. A product of two bf16 (fp16) values is exact in fp32, so this is what a
  bf16 (fp16) GEMM with fp32 accumulation computes.
- ``int8``: x quantised per tensor with a calibrated scale and zero point to uint8, W per
  output channel (symmetric, scale max|W[n,:]|/127) to int8; products summed in int32, then
  y = acc * scale[n] + bias'[n] with scale = x_scale * w_scale[n] and
  bias' = b - x_zero * sum_k Wq[n, k] * scale[n] (``quantize_pack`` computes both).

Layout: weights are packed at load time (Relax's LiftTransformParams) into panels
[ceil(N/NR), KW, NR]. For bf16 (int8) a panel element is one 32-bit word holding 2 (4)
consecutive k values, the operand layout of AVX-512's ``vdpbf16ps`` (``vpdpbusd``); for fp16
it is one fp16 value. The kernel first converts x into the same words (one vectorised pass
over [M, K], split over the cores), then runs MR x NR register tiles over the words, with the
M % MR left-over rows as 1 x NR tiles.

Instructions: where the target has ``avx512bf16`` (``avx512vnni``) each step is one
``vdpbf16ps`` (``vpdpbusd``) per 16 lanes: 2 (4) multiply-adds per lane per instruction.
Elsewhere the same words are unpacked with shifts and multiplied in fp32 (int32): the same
result on every target. LLVM 22 declares ``vdpbf16ps`` on ``<32 x bfloat>``, a type TVM's
code generator cannot name (it legalises bf16 to fp32), so the call goes through a three-line
LLVM IR wrapper on ``<16 x i32>`` imported with ``pragma_import_llvm`` and inlined.

The kernel is built with TVM's IR builder (as ``dense``): TVMScript's macros cost about 0.1 s
a kernel in Python's ``inspect``.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as B

from .dense import ACTIVATIONS, _epilogue, register_rows, row_loops, when

KINDS = ("bf16", "fp16", "int8")
PER_WORD = {"bf16": 2, "fp16": 1, "int8": 4}   # k values per packed panel element
QMAX = 127                                       # int8 weights are symmetric in [-127, 127]

_DPBF16 = """
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define internal <16 x float> @dlrmc_dpbf16(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {
  %a2 = bitcast <16 x i32> %a to <32 x bfloat>
  %b2 = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %a2, <32 x bfloat> %b2)
  ret <16 x float> %r
}
"""


def words(k: int, kind: str) -> int:
    """KW: packed elements along k."""
    return -(-int(k) // PER_WORD[kind])


def _panel_dtype(kind: str) -> str:
    return "float16" if kind == "fp16" else "int32"


def _bf16_bits(x):
    """float32 -> uint32 holding its bf16 (round to nearest even) in the low 16 bits."""
    u = T.reinterpret("uint32", x)
    return (u + T.uint32(0x7FFF) + ((u >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16)


def round_to(kind: str, x):
    """float32 ``x`` rounded to ``kind`` (fp32: unchanged), as float32."""
    if kind == "bf16":
        return T.reinterpret("float32", _bf16_bits(x) << T.uint32(16))
    if kind == "fp16":
        return T.Cast("float32", T.Cast("float16", x))
    return x


def _u8(x, inv_scale: float, zero: int):
    q = T.nearbyint(x * T.float32(inv_scale)) + T.float32(zero)
    return T.Cast("uint32", T.max(T.min(q, T.float32(255)), T.float32(0)))


def _word(kind: str, value, inv_scale: float = 1.0, zero: int = 0):
    """The packed element of ``value(p)`` (the p-th k value of the word, 0 past the end)."""
    if kind == "fp16":
        return T.Cast("float16", value(0))
    if kind == "bf16":
        return T.reinterpret("int32", _bf16_bits(value(0)) | (_bf16_bits(value(1)) << T.uint32(16)))
    w = T.uint32(0)
    for p in range(4):
        w = w | (value(p) << T.uint32(8 * p))
    return T.reinterpret("int32", w)


@functools.lru_cache(maxsize=None)
def pack_lowp_kernel(n: int, k: int, nr: int, kind: str):
    """bf16 / fp16: W [N, K] float32 -> panels [ceil(N/NR), KW, NR] (zero padded)."""
    if kind not in ("bf16", "fp16"):
        raise ValueError(f"pack_lowp_kernel packs bf16 or fp16, not {kind!r}")
    N, K, NR, P = int(n), int(k), int(nr), PER_WORD[kind]
    NB, KW = (N + NR - 1) // NR, words(K, kind)

    def value(vb, vk, vj, W):
        def at(p):
            ok = T.And(vb * NR + vj < N, vk * P + p < K)
            return T.if_then_else(ok, W[T.min(vb * NR + vj, N - 1), T.min(vk * P + p, K - 1)],
                                  T.float32(0))
        return at

    @T.prim_func(private=True, s_tir=True)
    def pack(w: T.handle, p: T.handle):
        W = T.match_buffer(w, (N, K), "float32")
        Pk = T.match_buffer(p, (NB, KW, NR), _panel_dtype(kind))
        for nb, kk, j in T.grid(NB, KW, NR):
            with T.sblock("pack"):
                vb, vk, vj = T.axis.remap("SSS", [nb, kk, j])
                Pk[vb, vk, vj] = _word(kind, value(vb, vk, vj, W))

    return pack


@functools.lru_cache(maxsize=None)
def quantize_pack_kernel(n: int, k: int, nr: int, x_scale: float, x_zero: int):
    """int8: (W [N, K], b [N]) -> (panels [NB, KW, NR] int32, terms [2, N]: scale, bias')."""
    N, K, NR = int(n), int(k), int(nr)
    NB, KW = (N + NR - 1) // NR, words(K, "int8")

    def q(W, sw, row, col):
        v = T.nearbyint(W[row, col] / sw[row])
        return T.Cast("int32", T.max(T.min(v, T.float32(QMAX)), T.float32(-QMAX)))

    @T.prim_func(private=True, s_tir=True)
    def quantize_pack(w: T.handle, b: T.handle, p: T.handle, t: T.handle):
        W = T.match_buffer(w, (N, K), "float32")
        Bv = T.match_buffer(b, (N,), "float32")
        Pk = T.match_buffer(p, (NB, KW, NR), "int32")
        terms = T.match_buffer(t, (2, N), "float32")
        amax = T.alloc_buffer((N,), "float32")
        sw = T.alloc_buffer((N,), "float32")
        colsum = T.alloc_buffer((N,), "int32")
        for nn, kk in T.grid(N, K):
            with T.sblock("amax"):
                vn, vk = T.axis.remap("SR", [nn, kk])
                with T.init():
                    amax[vn] = T.float32(0)
                amax[vn] = T.max(amax[vn], T.fabs(W[vn, vk]))
        for nn in range(N):
            with T.sblock("wscale"):
                vn = T.axis.spatial(N, nn)
                sw[vn] = T.max(amax[vn], T.float32(1e-30)) / T.float32(QMAX)
        for nn, kk in T.grid(N, K):
            with T.sblock("colsum"):
                vn, vk = T.axis.remap("SR", [nn, kk])
                with T.init():
                    colsum[vn] = 0
                colsum[vn] = colsum[vn] + q(W, sw, vn, vk)
        for nn in range(N):
            with T.sblock("epilogue_terms"):
                vn = T.axis.spatial(N, nn)
                terms[0, vn] = T.float32(x_scale) * sw[vn]
                terms[1, vn] = Bv[vn] - T.float32(x_zero) * T.Cast("float32", colsum[vn]) * (
                    T.float32(x_scale) * sw[vn])
        for nb, kk, j in T.grid(NB, KW, NR):
            with T.sblock("pack"):
                vb, vk, vj = T.axis.remap("SSS", [nb, kk, j])
                Pk[vb, vk, vj] = _word("int8", lambda p: T.if_then_else(
                    T.And(vb * NR + vj < N, vk * 4 + p < K),
                    T.Cast("uint32", q(W, sw, T.min(vb * NR + vj, N - 1), T.min(vk * 4 + p, K - 1))
                           & 255), T.uint32(0)))

    return quantize_pack


@functools.lru_cache(maxsize=None)
def dense_lowp_kernel(n: int, k: int, act: str = "none", mr: int = 6, nr: int = 32,
                      parallel_min_macs: int = 0, batch: int | None = None, kind: str = "bf16",
                      dot: bool = False, x_scale: float = 1.0, x_zero: int = 0,
                      parallel_min_bytes: int = 0):
    """The dense kernel (x, panels, b, y); for int8 b is the [2, N] terms (scale, bias').

    ``act="cross"``: a DCN cross layer's second GEMM with the layer in its epilogue, kernel
    (x, panels, b, x0, xl, y) and y = x0 * (x @ W^T + b) + xl, as ``dense_kernel``'s.

    ``dot``: use the target's dot-product instruction (``CpuKnobs.has_dot``; NR a multiple of 16).
    ``x_scale``/``x_zero``: int8's calibrated activation quantisation.
    """
    if act not in ACTIVATIONS + ("cross",):
        raise ValueError(f"activation {act!r} is not one of {ACTIVATIONS} or 'cross'")
    if kind not in KINDS:
        raise ValueError(f"precision {kind!r} is not one of {KINDS}")
    dot = bool(dot) and kind != "fp16"
    N, K, MR, NR = int(n), int(k), int(mr), int(nr)
    if dot and NR % 16:
        raise ValueError("the dot-product kernels need NR to be a multiple of 16")
    NB, KW, P = (N + NR - 1) // NR, words(K, kind), PER_WORD[kind]
    KWP = -(-KW // 16) * 16              # the activation words' row, padded to whole vectors
    ragged = N % NR != 0
    cross = act == "cross"
    epi = _epilogue(act)
    M, static, parallel, loop, tuned, tail_tuned = row_loops(
        N, K, batch, MR, parallel_min_macs, NB * KW * NR * 4, parallel_min_bytes)
    acc_dtype = "int32" if kind == "int8" else "float32"
    word_dtype = "float32" if kind == "fp16" else "int32"
    inv = 1.0 / float(x_scale)
    quant = kind == "int8"
    use_pragma = dot and kind == "bf16"
    pragma = _DPBF16
    bias_shape = (2, N) if quant else (N,)      # int8: rows scale, bias'
    bias_region = (slice(0, 2), slice(0, N)) if quant else slice(0, N)

    def x_value(A, row, kk):
        def at(p):
            v = T.if_then_else(kk * P + p < K, A[row, T.min(kk * P + p, K - 1)], T.float32(0))
            return _u8(v, inv, x_zero) if quant else v
        return at

    def convert(A, row, kk):
        if kind == "fp16":
            return round_to(kind, x_value(A, row, kk)(0))
        if quant:   # past K the word's bytes are x_zero codes against zero weights: no effect
            return _word("int8", x_value(A, row, kk))
        return _word(kind, x_value(A, row, kk))

    def finish(acc_v, Bv, col, row, X0, XL):
        v = T.Cast("float32", acc_v) * Bv[0, col] + Bv[1, col] if quant else acc_v + Bv[col]
        return X0[row, col] * v + XL[row, col] if cross else epi(v)

    with IRBuilder() as ib:
        with B.prim_func(private=True, s_tir=True):
            B.func_name("dense_cross" if cross else "dense")
            names = ("a", "w", "bias", "x0", "xl", "c") if cross else ("a", "w", "bias", "c")
            h = {name: B.arg(name, B.handle()) for name in names}
            A = B.match_buffer(h["a"], (M, K), "float32")
            W = B.match_buffer(h["w"], (NB, KW, NR), _panel_dtype(kind))
            Bv = B.match_buffer(h["bias"], bias_shape, "float32")
            X0 = B.match_buffer(h["x0"], (M, N), "float32") if cross else None
            XL = B.match_buffer(h["xl"], (M, N), "float32") if cross else None
            C = B.match_buffer(h["c"], (M, N), "float32")
            AW = B.alloc_buffer((M, KWP), word_dtype)

            def dot_step(acc, a_word, vb, kk):
                """acc[:] += (the row's word a_word) . (panel words W[vb, kk, :])"""
                if dot:
                    with B.unroll(NR // 16) as jv:
                        lanes = B.ramp(jv * 16, 1, 16)
                        if kind == "bf16":
                            step = B.call_pure_extern(
                                "float32x16", "dlrmc_dpbf16", acc[lanes],
                                B.Broadcast(a_word, 16), W[vb, kk, lanes])
                        else:
                            step = B.call_llvm_pure_intrin(
                                "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[lanes],
                                B.reinterpret("int8x64", B.Broadcast(a_word, 16)),
                                B.reinterpret("int8x64", W[vb, kk, lanes]))
                        B.buffer_store(acc, step, [lanes])
                elif kind == "int8":
                    with B.unroll(4) as p:
                        with B.vectorized(NR) as j:
                            B.buffer_store(acc, acc[j] + ((a_word >> (8 * p)) & 255) * (
                                (W[vb, kk, j] << (24 - 8 * p)) >> 24), [j])
                else:
                    with B.vectorized(NR) as j:
                        if kind == "fp16":
                            value = acc[j] + a_word * B.Cast("float32", W[vb, kk, j])
                        else:   # a word's two bf16 values, low then high, as float32
                            value = (acc[j] + B.reinterpret("float32", a_word << 16)
                                     * B.reinterpret("float32", W[vb, kk, j] << 16)
                                     + B.reinterpret("float32", a_word & -65536)
                                     * B.reinterpret("float32", W[vb, kk, j] & -65536))
                        B.buffer_store(acc, value, [j])

            def zero(accs):
                for acc in accs:
                    with B.vectorized(NR) as j:
                        B.buffer_store(acc, B.Cast(acc_dtype, 0), [j])

            def tile(rows, row0, vb):
                accs = register_rows(rows, NR, acc_dtype)
                if use_pragma:
                    with B.attr(B.int32(0), "pragma_import_llvm", pragma):
                        zero(accs)
                else:
                    zero(accs)
                with B.serial(KW) as kk:
                    for i, acc in enumerate(accs):
                        dot_step(acc, AW[row0 + i, kk], vb, kk)
                for i, acc in enumerate(accs):
                    with B.vectorized(NR) as j:
                        col = vb * NR + j
                        when((not ragged) or col < N, lambda: B.buffer_store(
                            C, finish(acc[j], Bv, B.min(col, N - 1), row0 + i, X0, XL),
                            [row0 + i, col]))

            def tiles(name, count, attrs, rows, row0, vb):
                with loop(count) as t:
                    with B.sblock(name):
                        vt = B.axis.spatial(count, t)
                        B.sblock_attr(attrs)
                        B.reads(AW[0:M, 0:KWP], W[0:NB, 0:KW, 0:NR], Bv[bias_region],
                                *([X0[0:M, 0:N], XL[0:M, 0:N]] if cross else []))
                        B.writes(C[0:M, 0:N])
                        tile(rows, row0(vt), vb(vt))

            with loop(M) as row:
                with B.sblock("convert"):
                    vr = B.axis.spatial(M, row)
                    B.sblock_attr(tuned)
                    B.reads(A[vr, 0:K])
                    B.writes(AW[vr, 0:KWP])
                    # a vector at a time: one vector of KWP lanes took LLVM minutes at K=3456
                    with B.serial(KWP // 16) as kv:
                        with B.vectorized(16) as kl:
                            B.buffer_store(AW, convert(A, vr, kv * 16 + kl), [vr, kv * 16 + kl])
            when(M >= MR, lambda: tiles("tile", M // MR * NB, tuned, MR,
                                        lambda vt: vt // NB * MR, lambda vt: vt % NB))
            tiles("tail", M % MR * NB, tail_tuned, 1, lambda vt: M // MR * MR + vt // NB,
                  lambda vt: vt % NB)
    dense = ib.get()

    return dense
