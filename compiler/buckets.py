"""Batch buckets: static-batch copies of ``main`` in the same module.

MetaSchedule cannot tune a symbolic batch, and a static batch lets TVM fold every shape
check, so ``add_buckets`` adds ``main_b{B}`` for each bucket B: ``main`` with the batch bound
to B and each of our kernels rebuilt at B (``dlrmc.schedules.kernels.at_batch``), whose work
loops ``dlrmc.schedules.tuning`` then schedules from a tuning log or by default. ``main``
stays as the symbolic-batch fallback. The runtime picks the entry (``dlrmc.runtime.plan``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..artifact.format import MAX_BUCKET
from ..schedules.kernels import at_batch

DEFAULT_BUCKETS = (1, 64, 512, 2048)


def entry_name(batch: int) -> str:
    return f"main_b{batch}"


def parse_buckets(text: str) -> tuple[int, ...]:
    """``"1,64,512"`` -> (1, 64, 512); ``""`` or ``"none"`` -> () (symbolic batch only)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--buckets wants batch sizes separated by commas, got {text!r}") \
            from None
    return checked_buckets(values)


def checked_buckets(values) -> tuple[int, ...]:
    """Batch sizes as sorted distinct ints, each 1 to ``MAX_BUCKET``, else a ValueError."""
    values = sorted({int(v) for v in values})
    bad = [v for v in values if not 0 < v <= MAX_BUCKET]
    if bad:
        raise ValueError(f"batch buckets must be 1 to {MAX_BUCKET} (larger batches run on the "
                         f"any-batch entry), got {bad[0]}")
    return tuple(values)


@mutator
class _RebuildKernels(PyExprMutator):
    """Point every call_tir of one of our kernels at its static-batch version."""

    def __init__(self, mod: tvm.IRModule, batch: int, knobs):
        super().__init__(mod)
        self.mod, self.batch, self.knobs, self.done = mod, batch, knobs, {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir") or not isinstance(call.args[0],
                                                                          tvm.ir.GlobalVar):
            return call
        gv = call.args[0]
        if gv.name_hint not in self.done:
            static = at_batch(self.mod[gv], self.batch, self.knobs)
            self.done[gv.name_hint] = gv if static is None else self.builder_.add_func(
                static, f"{gv.name_hint}_b{self.batch}")
        new_gv = self.done[gv.name_hint]
        return relax.Call(call.op, [new_gv, *call.args[1:]], call.attrs, call.ty_args)


def add_buckets(mod: tvm.IRModule, buckets, knobs=None) -> tvm.IRModule:
    """``mod`` plus ``main_b{B}`` for every bucket B (``knobs``: a CPU target's, for the
    kernels' static-batch choices)."""
    main = mod["main"]
    batch = main.params[0].ty.shape[0]
    if not isinstance(batch, tvm.tirx.Var):
        raise ValueError("the model's batch dimension is not symbolic; nothing to bucket")
    for b in buckets:
        bound = relax.transform.BindSymbolicVars({batch: int(b)}, "main")(mod)
        rebuilder = _RebuildKernels(bound, int(b), knobs)
        func = rebuilder.visit_expr(bound["main"])
        mod = rebuilder.builder_.get()
        mod["main"] = main
        mod[entry_name(b)] = func.with_attr("global_symbol", entry_name(b))
    return mod
