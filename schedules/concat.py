"""Row-wise concatenation of 2-D tensors: out[b] = [x_0[b], x_1[b], ...].

Contract: inputs [B, w_k] float32 with static widths, B symbolic; output [B, sum w_k]. This is
the ``cat`` interaction (R = cat([x, e_1, ..])) and any other concat along the last axis.
TVM's stock concatenate tests every output element against every input's range; here each
input is one vectorised row copy. Rows are split over the cores in chunks above
``PARALLEL_MIN_BATCH``. Built with TVM's IR builder (one buffer per input).
"""

from __future__ import annotations

import functools

from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

from .work_rule import split_work

CHUNK = 64
PARALLEL_MIN_BATCH = 256


@functools.lru_cache(maxsize=None)
def concat_kernel(widths: tuple[int, ...], batch: int | None = None):
    """A PrimFunc (x_0, .., x_{n-1}, out) concatenating along the last axis (B symbolic unless
    ``batch``)."""
    widths = tuple(int(w) for w in widths)
    total = sum(widths)
    with IRBuilder() as ib:
        with T.prim_func(private=True, s_tir=True):
            T.func_name("concat_rows")
            handles = [T.arg(f"x{k}", T.handle()) for k in range(len(widths))]
            result = T.arg("out", T.handle())
            B = T.int64() if batch is None else T.int64(batch)
            xs = [T.match_buffer(h, (B, w), "float32") for h, w in zip(handles, widths)]
            out = T.match_buffer(result, (B, total), "float32")
            chunks = (B + CHUNK - 1) // CHUNK

            def rows(vc):
                T.reads(*[x[0:B, 0:w] for x, w in zip(xs, widths)])
                T.writes(out[0:B, 0:total])
                with T.serial(T.min(CHUNK, B - vc * CHUNK)) as s:
                    b = vc * CHUNK + s
                    start = 0
                    for x, w in zip(xs, widths):
                        with T.vectorized(w) as j:
                            T.buffer_store(out, x[b, j], [b, start + j])
                        start += w

            split_work(chunks, B >= PARALLEL_MIN_BATCH, "rows", rows)
    return ib.get()
