"""Reports of a tuning log: its tuning curve, as numbers and as a PNG (``dlrm-bench --curve``).
The log itself, and its task table, are ``dlrmc.schedules.tuning.log``'s."""

from __future__ import annotations

import json
import os

import numpy as np


def tuning_curve(log_dir: str, manifest: dict) -> tuple[list[int], list[float]]:
    """(trials so far, sum over the tasks of their best latency so far) after each measured
    record, in measurement order, from the point every task has one."""
    with open(os.path.join(log_dir, "database_workload.json")) as f:
        hashes = [json.loads(line)[0] for line in f if line.strip()]
    ours = {t["workload"] for t in manifest["tasks"]}
    best: dict[str, float] = {}
    xs, ys, count = [], [], 0
    with open(os.path.join(log_dir, "database_tuning_record.json")) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            shash = hashes[record[0]]
            if shash not in ours:
                continue
            count += 1
            run_secs = record[1][1]      # [workload, [trace, run_secs, target, args]]
            secs = float(np.mean(run_secs)) if run_secs else 1e10
            if secs < 1e9:
                best[shash] = min(secs, best.get(shash, secs))
            if len(best) == len(ours):
                xs.append(count)
                ys.append(sum(best.values()))
    return xs, ys


def plot_curve(trials: list[int], seconds: list[float], path: str) -> None:
    """The tuning curve as a PNG (matplotlib, from the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(trials, [s * 1e6 for s in seconds], marker=".")
    ax.set_xlabel("trials (all tasks)")
    ax.set_ylabel("sum of the tasks' best latency (us)")
    ax.set_title("dlrm-tune: best latency against trials")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
