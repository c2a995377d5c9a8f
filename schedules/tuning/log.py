"""Tuning logs: their manifest, reading them, reporting them, and replaying them.

A tuning log is a directory: MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) plus ``dlrmc_tuning.json`` (``LOG_MANIFEST``: target, model
hash, buckets, indices per bag, trials, the tasks with their work, best latency and workload
hash, versions). ``schedule_kernels`` schedules a module's kernels from a log (or by default).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from .. import work_rule
from ..kernels import recipe, with_args
from .tasks import Task, extract_tasks, has_work_loops

LOG_MANIFEST = "dlrmc_tuning.json"
LOG_FORMAT = 1


class TuningLogError(ValueError):
    """A tuning log that is missing, corrupt, or made for another target or model."""




def records(db, task: Task) -> list:
    if not db.has_workload(task.mod):
        return []
    return list(db.get_top_k(db.commit_workload(task.mod), 1 << 30))


def best_seconds(records) -> float | None:
    secs = [float(np.mean([float(s) for s in r.run_secs])) for r in records if r.run_secs]
    secs = [s for s in secs if s < 1e9]
    return min(secs) if secs else None


def is_default(record) -> bool:
    """Whether a record is a kernel's default schedule (``tune.measure_defaults``): the only
    traces that sample no decision."""
    return not any(inst.kind.name == "SampleCategorical" for inst in record.trace.insts)


def default_seconds(records) -> float | None:
    return best_seconds([r for r in records if is_default(r)])


def task_table(manifest: dict) -> str:
    """Each task's trials, best latency and achieved rate, as a terminal table; on a kernel's
    default-variant row, its default schedule's latency and the gain of the kernel's best
    over all its variants (what the replay runs) against it."""
    kernel_best: dict[str, float] = {}
    for t in manifest["tasks"]:
        kernel = t["name"].split("[")[0]
        if t["best_s"] is not None:
            kernel_best[kernel] = min(t["best_s"], kernel_best.get(kernel, t["best_s"]))
    lines = [f"{'task':<34} {'trials':>6} {'best':>11}  {'rate':<15} {'default':>11}  gain"]
    for t in manifest["tasks"]:
        best = t["best_s"]
        if best is None:
            lines.append(f"{t['name']:<34} {t['trials']:>6} {'-':>11}  -")
            continue
        unit = "GFLOP/s" if t["unit"] == "FLOP" else "GB/s"
        rate = f"{t['work'] / best / 1e9:.1f} {unit}"
        line = f"{t['name']:<34} {t['trials']:>6} {best * 1e6:>8.1f} us  {rate:<15}"
        default = t.get("default_s")
        if default:
            line += f" {default * 1e6:>8.1f} us  {default / kernel_best[t['name']]:.2f}x"
        lines.append(line.rstrip())
    return "\n".join(lines)


def read_manifest(log_dir: str) -> dict:
    path = os.path.join(log_dir, LOG_MANIFEST)
    if not os.path.isdir(log_dir):
        raise TuningLogError(f"tuning log {log_dir} does not exist")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise TuningLogError(f"{log_dir} is not a dlrmc tuning log (no {LOG_MANIFEST}; make one "
                             "with dlrm-tune)") from None
    except (OSError, ValueError, RecursionError) as e:    # RecursionError: nested absurdly
        raise TuningLogError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict):
        raise TuningLogError(f"{path} is corrupt: not a JSON object")
    if manifest.get("format") != LOG_FORMAT:
        raise TuningLogError(f"{path}: unsupported tuning-log format {manifest.get('format')!r}")
    return manifest


def open_database(log_dir: str):
    for name in ("database_workload.json", "database_tuning_record.json"):
        if not os.path.exists(os.path.join(log_dir, name)):
            raise TuningLogError(f"{log_dir} lacks MetaSchedule's {name}")
    try:
        return ms.database.JSONDatabase(work_dir=log_dir, allow_missing=False)
    except Exception as e:  # noqa: BLE001 - MetaSchedule raises TVMError subtypes
        raise TuningLogError(f"cannot read the MetaSchedule database in {log_dir}: "
                             f"{str(e).splitlines()[-1]}") from None


def schedule_kernels(mod: tvm.IRModule, target: tvm.target.Target,
                     log_dir: str | None = None, expect: dict | None = None,
                     warn: Callable[[str], None] = print) -> tuple[tvm.IRModule, dict]:
    """Schedule every kernel's work loops: where the tuning log has records for the kernel,
    rebuild it as its fastest measured variant and replay that variant's best trace; else
    the default schedule. ``expect`` (target, model hash) is checked against the log's
    manifest. Returns the module and a summary {"tuned": {kernel: variant}, "default": [...]}."""
    db, per_bag = None, 1
    if log_dir is not None:
        manifest = read_manifest(log_dir)
        for key in ("target", "model_hash"):
            if expect and manifest.get(key) != expect.get(key):
                what = "target" if key == "target" else "model architecture"
                problem = (f"the tuning log {log_dir} was made for another {what} "
                           f"({manifest.get(key)!r}; this build: {expect.get(key)!r})")
                if key == "target":
                    raise TuningLogError(problem)
                warn(f"warning: {problem}")
        db = open_database(log_dir)
        per_bag = int(manifest.get("indices_per_bag", 1))
    best: dict[str, tuple] = {}          # kernel -> (seconds, task, record)
    if db is not None:
        for task in extract_tasks(mod, target, per_bag):
            for record in records(db, task):
                secs = best_seconds([record])
                if secs is not None and secs < best.get(task.function, (1e30,))[0]:
                    best[task.function] = (secs, task, record)
    summary = {"tuned": {}, "default": []}
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or not has_work_loops(func):
            continue
        if gv.name_hint in best:
            _, task, record = best[gv.name_hint]
            variant = with_args(recipe(func), task.override)
            sch = s_tir.Schedule(tvm.IRModule({"main": variant}))
            record.trace.apply_to_schedule(sch, remove_postproc=True)
            mod[gv] = sch.mod["main"]
            summary["tuned"][gv.name_hint] = task.name
        else:
            mod[gv] = work_rule.apply_default(func)
            summary["default"].append(gv.name_hint)
    if db is not None and summary["default"]:
        missing = ", ".join(summary["default"])
        if not summary["tuned"]:
            raise TuningLogError(f"the tuning log {log_dir} has no record for any task of this "
                                 f"model; tasks without a record: {missing}")
        warn(f"warning: the tuning log has no record for {len(summary['default'])} task(s), "
             f"which keep the default schedule: {missing}")
    return mod, summary
