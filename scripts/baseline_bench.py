"""Time per batch of a compiled artifact next to PyTorch eager, in one process.

    python scripts/baseline_bench.py --preset kaggle --batches 1,64,512,2048

Compiles the model (untuned, default schedules) into a temporary artifact unless --artifact
is given, then times both at each batch size (median of --repeat runs, 2 threads, one index
per bag unless --bag-size) and prints a Markdown table with the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from dlrmc.compiler.build import compile_model
from dlrmc.frontend.source import add_model_args, model_from_args
from dlrmc.runtime import load
from dlrmc.runtime.batch import random_batch


def _median_us(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--target", default="host")
    p.add_argument("--batches", default="1,64,512,2048")
    p.add_argument("--bag-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, arch = model_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        compile_model(model, arch, args.target, f"{tmp}/a")
        compiled = load(f"{tmp}/a")
        rows = []
        for b in (int(x) for x in args.batches.split(",")):
            dense, offsets, indices = random_batch(compiled.arch, b, args.bag_size, seed=b)
            td, to, ti = (torch.from_numpy(dense), torch.from_numpy(offsets),
                          [torch.from_numpy(i) for i in indices])
            with torch.no_grad():
                eager = _median_us(lambda: model(td, to, ti), args.repeat)
            ours = float(np.median(compiled.time_per_batch(dense, offsets, indices,
                                                           repeat=args.repeat))) * 1e6
            rows.append((b, eager, ours))
            print(f"B={b}: PyTorch eager {eager:,.0f} us, dlrmc {ours:,.0f} us", flush=True)
    print("\n| batch | PyTorch eager | dlrmc (untuned) | dlrmc / eager |\n|---|---|---|---|")
    for b, eager, ours in rows:
        print(f"| {b} | {eager:,.0f} us | {ours:,.0f} us | {ours / eager:.1f}x |")


if __name__ == "__main__":
    main()
