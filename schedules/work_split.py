"""Work items split over the cores only when there is enough work.

Waking TVM's thread pool costs microseconds, more than a batch-1 kernel. With a symbolic
batch each kernel emits its work items twice, under a run-time test: a parallel loop when the
batch is large enough, a serial one otherwise. With a static batch (a batch bucket) the test
is decided here: small work runs serially; enough work becomes a serial loop whose block is
left to the ``dlrmc_work`` schedule (``dlrmc.schedules.work_schedule``), which splits and
parallelises it by default and is what MetaSchedule tunes.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm.tirx.script.builder import ir as T

RULE = "dlrmc_work"   # the block annotation naming our MetaSchedule rule


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
