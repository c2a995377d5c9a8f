"""Tuning our static-batch kernels with MetaSchedule into a tuning log (``tuning_log``).

``tune`` first measures every kernel's default schedule (the kernel as lowered, one work item
per parallel task) and records it in the log, so the replay, which takes each kernel's
fastest record, is never slower than the default as measured on that machine; then it runs
MetaSchedule's task scheduler (round robin, ReplayTrace: the spaces are small) over
``tasks.extract_tasks``'s tasks, measuring with ``measure``'s runners. It resumes what a log
directory already holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from typing import Callable

import numpy as np
import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import work_rule
from .log import (LOG_FORMAT, LOG_MANIFEST, TuningLogError, best_seconds, default_seconds,
                  read_manifest, records)
from .measure import build_kernel, make_runner, skip_tensor_intrinsics
from .tasks import Task


def model_hash(arch: dict) -> str:
    """What a tuning log's records depend on: the architecture (shapes), not the weights."""
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Reports every measured batch of candidates and stops all tasks past the time budget."""

    def __init__(self, report: Callable[[int, int, float | None], None], deadline: float | None):
        super().__init__()
        self.report, self.deadline = report, deadline

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        secs = [float(np.mean([float(s) for s in r.run_secs])) for r in runner_results
                if r.error_msg is None and r.run_secs]
        self.report(task_id, len(measure_candidates), min(secs) if secs else None)
        if self.deadline is not None and time.time() > self.deadline:
            for i, rec in enumerate(task_scheduler.tasks_):
                if not rec.is_terminated:
                    task_scheduler.terminate_task(i)


def measure_defaults(tasks: list[Task], target: tvm.target.Target, db, builder, runner,
                     deadline: float | None, report: Callable[[Task], None]) -> None:
    """Measure and record the default schedule of every default-variant task that has none
    in ``db`` yet, until ``deadline``, with the search's ``builder`` and ``runner``;
    ``report(task)`` after each."""
    for task in tasks:
        if task.override or default_seconds(records(db, task)) is not None:
            continue
        sch = work_rule.schedule_default(s_tir.Schedule(task.mod))
        (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
        if built.error_msg:
            raise TuningLogError(f"the default schedule of {task.name} does not build: "
                                 f"{built.error_msg.splitlines()[-1]}")
        args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
        device = "cuda" if target.kind.name == "cuda" else "cpu"
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args)])
        result = future.result()
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
        if result.error_msg:
            raise TuningLogError(f"the default schedule of {task.name} failed to run: "
                                 f"{result.error_msg.splitlines()[-1]}")
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(task.mod), result.run_secs, target, args))
        report(task)
        if deadline is not None and time.time() > deadline:
            return      # at least one measured each run, so a budget run always progresses


def trial_plan(trials: int, num_tasks: int) -> tuple[int, int]:
    """Trials per task and in all: ``trials`` split evenly, rounded up to whole rounds."""
    per_task = math.ceil(trials / num_tasks)
    return per_task, per_task * num_tasks


def tune(tasks: list[Task], target: tvm.target.Target, log_dir: str, trials: int,
         manifest: dict, time_budget_s: float | None = None, runner=None,
         progress: Callable[[str, int, int, float | None], None] | None = None) -> dict:
    """Tune ``tasks`` for ``trials`` in all (split evenly), resuming what ``log_dir`` has.

    ``manifest`` (target, model hash, buckets, indices per bag) must match a log being
    resumed. ``progress(task_name, trials_done, trials_total, best_seconds)`` is called after
    every measured batch. Returns the log manifest written to ``log_dir``.
    """
    if not tasks:
        raise TuningLogError("the model has no tunable kernels at these buckets")
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, LOG_MANIFEST)
    if os.path.exists(path):
        old = read_manifest(log_dir)
        for key in ("target", "model_hash", "buckets", "indices_per_bag"):
            if old.get(key) != manifest.get(key):
                raise TuningLogError(f"{log_dir} holds a log for another {key.replace('_', ' ')} "
                                     f"({old.get(key)!r}, not {manifest.get(key)!r}); use a new "
                                     "directory")
    db = ms.database.JSONDatabase(work_dir=log_dir)
    per_task, total = trial_plan(trials, len(tasks))
    deadline = time.time() + time_budget_s if time_budget_s else None
    runner = runner or make_runner()
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=60, f_build=build_kernel)
    skip_tensor_intrinsics()
    done = {t.name: min(len(records(db, t)), per_task) for t in tasks}

    def default_measured(task):
        done[task.name] = min(done[task.name] + 1, per_task)
        if progress:
            progress(task.name, sum(done.values()), total, best_seconds(records(db, task)))

    measure_defaults(tasks, target, db, builder, runner, deadline, default_measured)
    # Least-measured first: a time budget cut short last time resumes where it stopped.
    todo = sorted((t for t in tasks if done[t.name] < per_task), key=lambda t: done[t.name])
    state = {"done": sum(done.values()), "best": {}}

    def report(task_id, measured, best):
        task = todo[task_id]
        state["done"] += measured
        if best is not None:
            state["best"][task.name] = min(best, state["best"].get(task.name, best))
        if progress:
            progress(task.name, state["done"], total, state["best"].get(task.name))

    if todo and (deadline is None or time.time() < deadline):
        contexts = [ms.TuneContext(
            mod=t.mod, target=target,
            space_generator=ms.space_generator.PostOrderApply(
                sch_rules=[ms.schedule_rule.ApplyCustomRule()], postprocs=[], mutator_probs={}),
            search_strategy=ms.search_strategy.ReplayTrace(), task_name=t.name,
            num_threads=1) for t in todo]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms.tune_tasks(
                tasks=contexts, task_weights=[1.0] * len(todo), work_dir=log_dir,
                # MetaSchedule counts this run's trials only: cap each task at what it lacks
                max_trials_global=sum(per_task - done[t.name] for t in todo),
                max_trials_per_task=max(per_task - done[t.name] for t in todo),
                num_trials_per_iter=min(8, max(per_task - done[t.name] for t in todo)),
                builder=builder, runner=runner, database=db, cost_model="random",
                measure_callbacks=[ms.measure_callback.AddToDatabase(),
                                   ms.measure_callback.RemoveBuildArtifact(),
                                   _Progress(report, deadline)],
                task_scheduler="round-robin")
    result = dict(manifest)
    result["format"] = LOG_FORMAT
    result["trials_per_task"] = per_task
    result["tasks"] = []
    for t in tasks:
        measured = records(db, t)
        result["tasks"].append({"name": t.name, "kind": t.kind, "batch": t.batch,
                                "work": t.work, "unit": t.unit, "trials": len(measured),
                                "best_s": best_seconds(measured),
                                "default_s": default_seconds(measured),
                                "workload": str(db.commit_workload(t.mod).as_json()[0])})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result
