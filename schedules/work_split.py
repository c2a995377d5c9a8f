"""Work items split over the cores only when there is enough work (for IR-builder kernels).

Waking TVM's thread pool costs microseconds, more than a batch-1 kernel; so each kernel emits
its work items twice, under a run-time test: a parallel loop when the batch is large enough,
a serial one otherwise.
"""

from __future__ import annotations

from typing import Callable

from tvm.tirx.script.builder import ir as T


def split_work(items, enough, name: str, body: Callable) -> None:
    """Emit ``body(item)`` for every item, in one block per item; in parallel when ``enough``."""
    with T.If(enough):
        with T.Then():
            _loop(T.parallel, items, name, body)
        with T.Else():
            _loop(T.serial, items, f"{name}_serial", body)


def _loop(loop, items, name: str, body: Callable) -> None:
    with loop(items) as i:
        with T.sblock(name):
            body(T.axis.spatial(items, i))
