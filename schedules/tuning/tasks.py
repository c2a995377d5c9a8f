"""Tuning tasks: our static-batch kernels as MetaSchedule sees them.

A *task* is one of our kernels inside a batch bucket (``main_b{B}``) that has work loops
left to the ``dlrmc_work`` rule (``dlrmc.schedules.work_rule``), in one variant of its discrete knobs
(``kernels.variants``). MetaSchedule measures a task with every shape static, so its symbolic
index counts are bound to ``B * indices_per_bag``; the trace it records only touches the
work loops, so ``tuning_log.schedule_kernels`` replays it on the bucket's kernel, whose
index counts stay symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax, s_tir

from ...frontend.ops import num_pairs
from ...targets.knobs import cpu_knobs
from .. import work_rule
from ..embedding_bag import bag_tables
from ..kernels import KERNEL_ATTR, recipe, variants, with_args


@dataclass
class Task:
    """One kernel of one bucket: what MetaSchedule tunes."""

    name: str                  # the kernel's global name in the module (e.g. dense_512x13_relu_b64)
    kind: str                  # embedding_bags | dot_interaction | dense | concat_rows
    batch: int
    mod: tvm.IRModule          # the kernel with every shape static, as function "main"
    work: float                # FLOPs (dense, interaction) or bytes moved (embeddings, concat)
    unit: str                  # "FLOP" or "B"
    function: str = ""         # the kernel's name in the module
    override: dict = field(default_factory=dict)   # the variant's knobs (kernels.variants)


def _call_site_shapes(mod: tvm.IRModule) -> dict[str, list]:
    """For every PrimFunc called by call_tir: the argument shapes of (one of) its calls."""
    shapes: dict[str, list] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for _, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue

        def visit(expr):
            if isinstance(expr, relax.Call) and expr.op == call_tir:
                args = expr.args[1].fields if isinstance(expr.args[1], relax.Tuple) else [
                    expr.args[1]]
                outs = expr.ty_args[0]
                outs = list(outs.fields) if isinstance(outs, relax.TupleType) else [outs]
                shapes[expr.args[0].name_hint] = [list(a.ty.shape) for a in args] + [
                    list(o.shape) for o in outs]

        relax.analysis.post_order_visit(func.body, visit)
    return shapes


def _static_task_func(func: tvm.tirx.PrimFunc, arg_shapes: list, fill: int) -> tvm.tirx.PrimFunc:
    """``func`` with each symbolic buffer dimension bound: to the call site's static size, or
    (index counts, symbolic there too) to ``fill``."""
    binding = {}
    for buf, shape in zip(func.params, arg_shapes):
        for dim, value in zip(buf.shape, shape):
            if isinstance(dim, tvm.tirx.Var) and dim not in binding:
                binding[dim] = int(value) if isinstance(value, tvm.tirx.IntImm) else fill
    new_buffers = {}
    for buf in func.params:     # a PrimFunc's parameters are its buffers
        if any(isinstance(d, tvm.tirx.Var) for d in buf.shape):
            shape = [binding.get(d, d) if isinstance(d, tvm.tirx.Var) else d for d in buf.shape]
            new_buffers[buf] = tvm.tirx.decl_buffer(
                shape, buf.dtype, buf.name, elem_offset=buf.elem_offset, strides=buf.strides,
                data_alignment=buf.data_alignment, offset_factor=buf.offset_factor)
    return func.specialize(new_buffers) if new_buffers else func


def _work(r: dict, batch: int, per_bag: int) -> tuple[float, str]:
    a = r["args"]
    if r["kernel"] in ("dense", "dense_lowp"):
        return 2.0 * batch * a["n"] * a["k"], "FLOP"
    if r["kernel"] == "dot_interaction":
        return 2.0 * batch * num_pairs(a["num_features"], a["self_interaction"]) * a["dim"], "FLOP"
    if r["kernel"] == "embedding_bags":
        tables = bag_tables(a["offset_rows"], a.get("flat_tables"))
        return 4.0 * batch * tables * per_bag * a["dim"], "B"
    return 8.0 * batch * sum(a["widths"]), "B"     # concat: read + write


def _index_count(r: dict, batch: int, per_bag: int) -> int:
    """The indices a measured call of this kernel reads in one index array: the batch's bags
    times ``per_bag``, and times the tables when one flat array holds them all."""
    flat = r["args"].get("flat_tables") if r["kernel"] == "embedding_bags" else None
    return batch * per_bag * (flat or 1)


def has_work_loops(func: tvm.tirx.PrimFunc) -> bool:
    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return False          # our GPU kernels: thread-bound already, nothing to tune here
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    return bool(work_rule.annotated_blocks(sch))


def _variant_name(kernel: str, override: dict) -> str:
    return kernel + ("[" + ",".join(f"{k}={v}" for k, v in sorted(override.items())) + "]"
                     if override else "")


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target,
                  indices_per_bag: int = 1) -> list[Task]:
    """The tunable kernels of ``mod``'s bucket functions, each in every variant of its
    discrete knobs (``dlrmc.schedules.kernels.variants``), in module order."""
    shapes = _call_site_shapes(mod)
    knobs = cpu_knobs(target)
    tasks = []
    for gv, func in mod.functions.items():
        r = recipe(func)
        if r is None or r["args"].get("batch") is None or not has_work_loops(func):
            continue
        batch = int(r["args"]["batch"])
        work, unit = _work(r, batch, indices_per_bag)
        for override in variants(r, knobs):
            static = _static_task_func(with_args(r, override), shapes[gv.name_hint],
                                       _index_count(r, batch, indices_per_bag))
            task_mod = tvm.IRModule({"main": static.without_attr(KERNEL_ATTR).with_attr(
                "global_symbol", "main")})
            tasks.append(Task(_variant_name(gv.name_hint, override), r["kernel"], batch,
                              task_mod, work, unit, gv.name_hint, override))
    return tasks
