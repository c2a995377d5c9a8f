"""Where one artifact's bare compiled call spends its time: each kernel and Relax VM builtin,
timed through the VM's instrument hook over ``--calls`` calls of ``--distinct`` batches in
turn (the hook's own cost included, so the rows add up to a little more than the bare call,
timed again without it), per call, largest first.

    python scripts/kernel_times.py A.dlrmc [--batch 512] [--calls 50] [--threads 2]
        [--bag-size 1] [--distinct 8]
"""

from __future__ import annotations

import argparse
import collections
import time

from dlrmc.runtime import load
from dlrmc.runtime.batch import random_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bag-size", type=int, default=1, help="indices a bag")
    p.add_argument("--distinct", type=int, default=8,
                   help="distinct batches, called in turn (more than the caches hold: rows "
                        "read from memory)")
    args = p.parse_args()
    model = load(args.artifact, mmap=True, threads=args.threads)
    calls = [model.bind(*random_batch(model.arch, args.batch, args.bag_size, seed=s))
             for s in range(args.distinct)]
    for call in calls:          # warm: each batch once, and the VM this thread runs
        call()
    spent, count, started = collections.defaultdict(float), collections.Counter(), [0.0]

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            started[0] = time.perf_counter()
        else:
            spent[name] += time.perf_counter() - started[0]
            count[name] += 1
        return 0

    def run() -> float:
        start = time.perf_counter()
        for c in range(args.calls):
            calls[c % len(calls)]()
        return (time.perf_counter() - start) / args.calls * 1e6

    vm = model._vm()          # this thread's VM, the one the bound calls run on
    vm.set_instrument(instrument)
    instrumented = run()
    vm.set_instrument(None)
    print(f"B={args.batch} {args.artifact}: {run():,.1f} us a bare call "
          f"({instrumented:,.1f} us instrumented)")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"{seconds / args.calls * 1e6:10,.1f} us  x{count[name] // args.calls}  {name}")


if __name__ == "__main__":
    main()
