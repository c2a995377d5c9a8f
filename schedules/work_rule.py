"""The ``dlrmc_work`` rule: how our kernels' work items meet the cores, both halves of it.

Emitting (``split_work``, called by the kernels): waking TVM's thread pool costs
microseconds, more than a batch-1 kernel. With a symbolic batch each kernel emits its work
items twice, under a run-time test: a parallel loop when the batch is large enough, a serial
one otherwise. With a static batch (a batch bucket) the test is decided here: small work runs
serially; enough work becomes a serial loop in a block annotated ``schedule_rule =
"dlrmc_work"``, left to the schedule below.

Scheduling (the kernels hand-write what runs per work item, register tiles and vector loops;
this owns the loop over items):

- ``apply_default``: one work item per parallel task (what the symbolic-batch kernels do);
- ``sample``: a MetaSchedule custom rule (registered for the ``cpu`` and ``arm_cpu`` target
  keys) whose knob is the parallel grain: work items per task, from 1 up to all of them (one
  task: no thread-pool wake-up). MetaSchedule samples it, measures, and records the trace in
  the tuning log; ``dlrmc.schedules.tuning`` replays it.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import s_tir
from tvm.tirx.script.builder import ir as T

RULE = "dlrmc_work"   # the block annotation naming our MetaSchedule rule
GRAINS = (1, 2, 4, 8, 16, 32)


def static_value(expr):
    """The Python value of a constant expression (or a Python scalar), else None."""
    if isinstance(expr, (bool, int)):
        return expr
    if isinstance(expr, tvm.tirx.IntImm):
        return expr.value
    return None


def split_work(items, enough, name: str, body: Callable) -> None:
    """Emit ``body(item)`` for every item, in one block per item; in parallel when ``enough``."""
    decided = static_value(enough)
    if decided is not None:
        _loop(T.serial, items, name if decided else f"{name}_serial", body, tunable=bool(decided))
        return
    with T.If(enough):
        with T.Then():
            _loop(T.parallel, items, name, body)
        with T.Else():
            _loop(T.serial, items, f"{name}_serial", body)


def _loop(loop, items, name: str, body: Callable, tunable: bool = False) -> None:
    with loop(items) as i:
        with T.sblock(name):
            if tunable:
                T.sblock_attr({"schedule_rule": RULE})
            body(T.axis.spatial(items, i))


# --- scheduling -----------------------------------------------------------------------------

def annotated_blocks(sch: s_tir.Schedule) -> list:
    """The blocks of ``sch``'s function that are left to this schedule."""
    return [b for b in sch.get_child_blocks(sch.get_sblock("root"))
            if sch.get(b).annotations.get("schedule_rule") == RULE]


def grains(extent: int) -> list[int]:
    """The grains worth trying for a loop of ``extent`` work items (``extent``: one task)."""
    return sorted({g for g in GRAINS if g < extent} | {extent})


def _work_loop(sch: s_tir.Schedule, block):
    loop = sch.get_loops(block)[-1]
    extent = sch.get(loop).extent
    if not isinstance(extent, tvm.tirx.IntImm):
        raise ValueError("the dlrmc_work schedule needs a static number of work items")
    return loop, int(extent.value)


def apply(sch: s_tir.Schedule, block, grain) -> None:
    """Split the work loop into tasks of ``grain`` items (an int or a sampled variable)."""
    loop, _ = _work_loop(sch, block)
    tasks, _ = sch.split(loop, [None, grain])
    sch.parallel(tasks)
    sch.unannotate(block, "schedule_rule")


def schedule_default(sch: s_tir.Schedule) -> s_tir.Schedule:
    """``sch`` with every annotated block scheduled one work item per task (traced: the
    tuner records it as the kernel's default)."""
    for block in annotated_blocks(sch):
        apply(sch, block, 1)
    return sch


def apply_default(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """``func`` with every annotated block scheduled one work item per task."""
    return schedule_default(s_tir.Schedule(tvm.IRModule({"main": func}))).mod["main"]


def sample(sch: s_tir.Schedule, block) -> list:
    """The MetaSchedule rule: sample the grain, then apply it."""
    _, extent = _work_loop(sch, block)
    choices = grains(extent)
    grain = sch.sample_categorical(choices, [1.0 / len(choices)] * len(choices))
    apply(sch, block, grain)
    return [sch]


for _key in ("cpu", "arm_cpu"):
    tvm.register_global_func(f"s_tir.meta_schedule.{_key}.{RULE}", sample, override=True)
