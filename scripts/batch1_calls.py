"""Per-call time of artifacts' entry points at one batch size, the calls alternated in one
process (so the host's noise hits them alike): the bare compiled call (``bind``), ``predict``
(reference layout), ``predict_jagged`` (flat) and ``predict_kjt``, and with ``--numpy-fill``
the three again with their buffers filled in numpy (as an install without runtime/_fill.c
does); medians after the first tenth. Two artifacts of one model (say, before and after a
change) compare side by side.

    python scripts/batch1_calls.py A.dlrmc [B.dlrmc ...] [--batch 1] [--calls 3000] [--threads 2]
        [--bag-size 1] [--distinct 1] [--numpy-fill]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dlrmc.frontend.ops import flat_layout
from dlrmc.runtime import model as runtime_model
from dlrmc.runtime import load
from dlrmc.runtime.batch import random_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bag-size", type=int, default=1, help="indices a bag")
    p.add_argument("--distinct", type=int, default=1,
                   help="distinct batches, called in turn (more than the caches hold: rows "
                        "read from memory)")
    p.add_argument("--numpy-fill", action="store_true",
                   help="also time each predict with runtime/_fill.c switched off")
    args = p.parse_args()
    models = [load(a, mmap=True, threads=args.threads) for a in args.artifacts]
    data = []
    for seed in range(args.distinct):
        dense, lS_o, lS_i = random_batch(models[0].arch, args.batch, args.bag_size, seed=3 + seed)
        indices, offsets = flat_layout(lS_o, lS_i)
        data.append((dense, lS_o, lS_i, indices, offsets, np.diff(offsets)))
    calls = {}
    for path, m in zip(args.artifacts, models):
        bound = [m.bind(*d[:3]) for d in data]
        calls[f"{path} bare call"] = lambda i, bound=bound: bound[i]()
        calls[f"{path} predict"] = lambda i, m=m: m.predict(*data[i][:3])
        calls[f"{path} predict_jagged"] = lambda i, m=m: m.predict_jagged(
            data[i][0], *data[i][3:5])
        calls[f"{path} predict_kjt"] = lambda i, m=m: m.predict_kjt(data[i][0], data[i][3],
                                                                    data[i][5])
        if args.numpy_fill:
            for name in ("predict", "predict_jagged", "predict_kjt"):
                calls[f"{path} {name}, numpy fill"] = lambda i, call=calls[f"{path} {name}"]: (
                    numpy_fill(call, i))
    times = {name: [] for name in calls}
    for c in range(args.calls):
        for name, call in calls.items():
            start = time.perf_counter_ns()
            call(c % args.distinct)
            times[name].append(time.perf_counter_ns() - start)
    for name, t in times.items():
        print(f"B={args.batch} {name}: {np.median(t[args.calls // 10:]) / 1e3:,.1f} us")


def numpy_fill(call, i):
    """``call(i)`` with runtime/_fill.c switched off."""
    native, runtime_model.native_fill = runtime_model.native_fill, None
    try:
        return call(i)
    finally:
        runtime_model.native_fill = native


if __name__ == "__main__":
    main()
