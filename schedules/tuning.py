"""Tuning our static-batch kernels with MetaSchedule, and replaying tuning logs.

A *task* is one of our kernels inside a batch bucket (``main_b{B}``) that has work loops
left to the ``dlrmc_work`` rule (``work_schedule``). MetaSchedule measures a task with every
shape static, so its symbolic index counts are bound to ``B * indices_per_bag`` and its
inputs are valid ones (``alloc_arguments``: rows inside each table, monotone offsets); the
trace it records only touches the work loops, so ``apply_log`` replays it on the bucket's
kernel, whose index counts stay symbolic.

A tuning log is a directory: MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``) plus ``dlrmc_tuning.json`` (``LOG_MANIFEST``: target, model
hash, buckets, indices per bag, trials, the tasks with their work, versions).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from . import work_schedule
from .interaction import num_pairs
from ..targets.knobs import cpu_knobs
from .kernels import KERNEL_ATTR, recipe, variants, with_args

LOG_MANIFEST = "dlrmc_tuning.json"
LOG_FORMAT = 1


class TuningLogError(ValueError):
    """A tuning log that is missing, corrupt, or made for another target or model."""


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
    if r["kernel"] == "dense":
        return 2.0 * batch * a["n"] * a["k"], "FLOP"
    if r["kernel"] == "dot_interaction":
        return 2.0 * batch * num_pairs(a["num_features"], a["self_interaction"]) * a["dim"], "FLOP"
    if r["kernel"] == "embedding_bags":
        tables = len(a["offset_rows"] or [0])
        return 4.0 * batch * tables * per_bag * a["dim"], "B"
    return 8.0 * batch * sum(a["widths"]), "B"     # concat: read + write


def _has_work_loops(func: tvm.tirx.PrimFunc) -> bool:
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    return bool(work_schedule.annotated_blocks(sch))


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
        if r is None or r["args"].get("batch") is None or not _has_work_loops(func):
            continue
        batch = int(r["args"]["batch"])
        work, unit = _work(r, batch, indices_per_bag)
        for override in variants(r, knobs):
            static = _static_task_func(with_args(r, override), shapes[gv.name_hint],
                                       batch * indices_per_bag)
            task_mod = tvm.IRModule({"main": static.without_attr(KERNEL_ATTR).with_attr(
                "global_symbol", "main")})
            tasks.append(Task(_variant_name(gv.name_hint, override), r["kernel"], batch,
                              task_mod, work, unit, gv.name_hint, override))
    return tasks


# --- measuring --------------------------------------------------------------------------------

def _arguments(args_info) -> list[np.ndarray]:
    """Inputs for one measurement: random floats; valid ones for our embedding kernels, whose
    arguments are tables [V_k, D], then as many index arrays (kept inside table k), then
    offsets (equal bags)."""
    rng = np.random.default_rng(0)
    infos = [(str(i[1]), [int(s) for s in i[2]]) for i in args_info]
    is_float = [dtype.startswith("float") for dtype, _ in infos]
    lead = 0
    while lead < len(infos) and is_float[lead] and len(infos[lead][1]) == 2:
        lead += 1
    index_of = {lead + k: k for k in range(lead) if lead + k < len(infos)
                and not is_float[lead + k] and len(infos[lead + k][1]) == 1}
    count = infos[lead][1][0] if index_of else 0
    arrays = []
    for pos, (dtype, shape) in enumerate(infos):
        if is_float[pos] and np.prod(shape) > 1 << 22:   # big tables: values do not matter
            arrays.append(np.ones(shape, dtype))
        elif is_float[pos]:
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif pos in index_of:
            rows = max(infos[index_of[pos]][1][0], 1)
            arrays.append(rng.integers(0, rows, shape).astype(dtype))
        else:
            bags = max(shape[-1] - (1 if len(shape) == 1 and shape[-1] > 1 else 0), 1)
            starts = np.minimum(np.arange(shape[-1]) * max(count // bags, 1), count)
            arrays.append(np.broadcast_to(starts, shape).astype(dtype).copy())
    return arrays


def _to_device(arrays, device):
    out = []
    for a in arrays:
        t = tvm.runtime.empty(a.shape, a.dtype, device)
        t.copyfrom(a)
        out.append(t)
    return out


def alloc_arguments(device, args_info, alloc_repeat: int):
    """MetaSchedule's ``f_alloc_argument`` for the local runner."""
    return [_to_device(_arguments(args_info), device) for _ in range(alloc_repeat)]


def alloc_arguments_rpc(session, device, args_info, alloc_repeat: int):
    """MetaSchedule's ``f_alloc_argument`` for the RPC runner."""
    return alloc_arguments(device, args_info, alloc_repeat)


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule's ``f_build``: its default first imports ``tvm.s_tir.tensor_intrin``,
    which parses hundreds of TVMScript intrinsics (24 s on 2 cores, a minute with torch
    loaded) that our schedules never use."""
    from tvm.driver import build

    return build(mod, target=target)


def _skip_tensor_intrinsics() -> None:
    """TuneContext imports ``tvm.s_tir.tensor_intrin`` too (see ``build_kernel``); ours never
    tensorize, so stand an empty module in for it unless something imported it already."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name, "not loaded by dlrmc: no tensorization")


def _measure_on_every_core() -> None:
    """Runner workers' initializer: TVM's default thread count is half the cores on x86;
    measure with all of them, as the runtime runs (``dlrmc.runtime.set_threads``)."""
    from ..runtime.model import set_threads

    set_threads()


def make_runner(rpc_tracker: str | None = None, rpc_key: str | None = None,
                timeout_s: float = 30):
    """A local runner, or an RPC runner on the tracker ``HOST:PORT`` for devices of ``rpc_key``."""
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20,
                                          enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=evaluator,
                                     f_alloc_argument=alloc_arguments,
                                     initializer=_measure_on_every_core)
    host, _, port = rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not rpc_key:
        raise ValueError(f"--rpc-tracker wants HOST:PORT and --rpc-key a key, got "
                         f"{rpc_tracker!r} / {rpc_key!r}")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key,
                                 session_timeout_sec=max(60, int(timeout_s) * 2))
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                               f_alloc_argument=alloc_arguments_rpc, max_workers=1)


# --- tuning -----------------------------------------------------------------------------------

def model_hash(arch: dict) -> str:
    """What a tuning log's records depend on: the architecture (shapes), not the weights."""
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def _records(db, task: Task) -> list:
    if not db.has_workload(task.mod):
        return []
    return list(db.get_top_k(db.commit_workload(task.mod), 1 << 30))


def _best(records) -> float | None:
    secs = [float(np.mean([float(s) for s in r.run_secs])) for r in records if r.run_secs]
    secs = [s for s in secs if s < 1e9]
    return min(secs) if secs else None


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
    per_task = math.ceil(trials / len(tasks))
    done = {t.name: min(len(_records(db, t)), per_task) for t in tasks}
    # Least-measured first: a time budget cut short last time resumes where it stopped.
    todo = sorted((t for t in tasks if done[t.name] < per_task), key=lambda t: done[t.name])
    total = per_task * len(tasks)
    state = {"done": sum(done.values()), "best": {}}

    def report(task_id, measured, best):
        task = todo[task_id]
        state["done"] += measured
        if best is not None:
            state["best"][task.name] = min(best, state["best"].get(task.name, best))
        if progress:
            progress(task.name, state["done"], total, state["best"].get(task.name))

    if todo:
        _skip_tensor_intrinsics()
        deadline = time.time() + time_budget_s if time_budget_s else None
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
                num_trials_per_iter=min(8, max(per_task - done[t.name] for t in todo)), builder=ms.builder.LocalBuilder(
                    max_workers=1, timeout_sec=60, f_build=build_kernel),
                runner=runner or make_runner(), database=db, cost_model="random",
                measure_callbacks=[ms.measure_callback.AddToDatabase(),
                                   ms.measure_callback.RemoveBuildArtifact(),
                                   _Progress(report, deadline)],
                task_scheduler="round-robin")
    result = dict(manifest)
    result["format"] = LOG_FORMAT
    result["trials_per_task"] = per_task
    result["tasks"] = []
    for t in tasks:
        records = _records(db, t)
        result["tasks"].append({"name": t.name, "kind": t.kind, "batch": t.batch,
                                "work": t.work, "unit": t.unit, "trials": len(records),
                                "best_s": _best(records),
                                "workload": str(db.commit_workload(t.mod).as_json()[0])})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result


def task_table(manifest: dict) -> str:
    """Each task's trials, best latency and achieved rate, as a terminal table."""
    lines = [f"{'task':<34} {'trials':>6} {'best':>11}  rate"]
    for t in manifest["tasks"]:
        best = t["best_s"]
        if best is None:
            lines.append(f"{t['name']:<34} {t['trials']:>6} {'-':>11}  -")
            continue
        unit = "GFLOP/s" if t["unit"] == "FLOP" else "GB/s"
        lines.append(f"{t['name']:<34} {t['trials']:>6} {best * 1e6:>8.1f} us  "
                     f"{t['work'] / best / 1e9:.1f} {unit}")
    return "\n".join(lines)


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


# --- replay -----------------------------------------------------------------------------------

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
    except (OSError, ValueError) as e:
        raise TuningLogError(f"{path} is corrupt: {e}") from None
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
            for record in _records(db, task):
                secs = _best([record])
                if secs is not None and secs < best.get(task.function, (1e30,))[0]:
                    best[task.function] = (secs, task, record)
    summary = {"tuned": {}, "default": []}
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or not _has_work_loops(func):
            continue
        if gv.name_hint in best:
            _, task, record = best[gv.name_hint]
            variant = with_args(recipe(func), task.override)
            sch = s_tir.Schedule(tvm.IRModule({"main": variant}))
            record.trace.apply_to_schedule(sch, remove_postproc=True)
            mod[gv] = sch.mod["main"]
            summary["tuned"][gv.name_hint] = task.name
        else:
            mod[gv] = work_schedule.apply_default(func)
            summary["default"].append(gv.name_hint)
    if db is not None and summary["default"]:
        missing = ", ".join(summary["default"])
        if not summary["tuned"]:
            raise TuningLogError(f"the tuning log {log_dir} has no record for any task of this "
                                 f"model; tasks without a record: {missing}")
        warn(f"warning: the tuning log has no record for {len(summary['default'])} task(s), "
             f"which keep the default schedule: {missing}")
    return mod, summary
