"""From a torch DLRM to an artifact directory: export, lower, build, write.

Each stage is timed and reported through ``log``. ``prepare`` exports and lowers the model
and adds the static batch buckets (``buckets``); ``build`` schedules the buckets' kernels
(from a tuning log, else by default: ``dlrmc.schedules.tuning``), lifts everything that
depends only on the weights (the dense layers' weight packing) into one ``transform_params``
shared by every entry, which the runtime calls once at load; then Relax's ``zero`` pipeline
(legalize, fuse) and TVM's lowering.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable

import torch
import tvm
from tqdm import tqdm
from tvm import relax

from ..artifact import Manifest, write_artifact
from ..frontend.arch import Arch
from ..frontend.export import export_model
from ..schedules.tuning.tune import model_hash
from ..schedules.tuning.log import read_manifest as read_log_manifest
from ..targets import backend_for, parse_target, resolved
from ..targets.knobs import cpu_knobs
from .buckets import DEFAULT_BUCKETS, add_buckets, checked_buckets, entry_name
from .lower import Lowered, lower


class BuildError(ValueError):
    """A model or target dlrmc cannot build."""


def input_spec(arch: Arch) -> tuple[list[dict], dict]:
    """The artifact's inputs (the flat layout of ``dlrmc.frontend.ops``; an offsets shape
    entry ``"T*batch+1"`` written out with T) and dynamic dims."""
    inputs = [{"name": "dense_x", "dtype": "float32", "shape": ["batch", arch.num_dense]},
              {"name": "indices", "dtype": "int64", "shape": ["indices"]},
              {"name": "offsets", "dtype": "int64", "shape": [f"{arch.num_tables}*batch+1"]}]
    return inputs, {"batch": [1, None], "indices": [0, None]}


TRANSFORM_PARAMS = "transform_params"


def target_record(text: str | None, target: tvm.target.Target) -> dict:
    """The manifest's ``target``: what the user gave, TVM's resolved target, and what a
    machine needs to run the code (the backend's ``requirements``)."""
    return {"string": text or "host", "resolved": resolved(target),
            "requires": backend_for(target).requirements(target)}


def tuning_identity(arch: Arch, target: tvm.target.Target) -> dict:
    """What a tuning log must have been made for to apply to this build."""
    return {"target": resolved(target), "model_hash": model_hash(arch.to_dict())}


@contextlib.contextmanager
def _ticking(desc: str, show: bool):
    """While a step with no finer progress runs, a line on stderr counting its seconds."""
    if not show:
        yield
        return
    bar = tqdm(desc=desc, bar_format="{desc} {elapsed}", leave=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


def _stage(log: Callable[[str], None], name: str, show: bool, fn, *args, **kwargs):
    """Run one stage of the build: its seconds ticking on stderr (``show``), then logged."""
    t0 = time.perf_counter()
    with _ticking(f"[dlrmc] {name}", show):
        result = fn(*args, **kwargs)
    log(f"[dlrmc] {name:<6} {time.perf_counter() - t0:7.2f} s")
    return result


def prepare(model: torch.nn.Module, arch: Arch, target: tvm.target.Target, buckets=(),
            log: Callable[[str], None] = print, emb_quant: str | None = None,
            progress: bool = False, **numerics) -> Lowered:
    """Export and lower ``model`` (tables quantised with ``emb_quant``; ``numerics``:
    ``lower``'s precision, mlp_quant and calibration); its module gains ``main_b{B}`` for
    every bucket."""
    ep = _stage(log, "export", progress, export_model, model, arch)
    lowered = _stage(log, "lower", progress, lower, ep, target, emb_quant=emb_quant,
                     sources=getattr(model, "table_sources", None), **numerics)
    if buckets:
        knobs = cpu_knobs(target) if backend_for(target).lowering == "cpu" else None
        lowered.mod = add_buckets(lowered.mod, buckets, knobs)
    return lowered


def build(lowered: Lowered, target: tvm.target.Target, tuning_log: str | None = None,
          expect: dict | None = None, log: Callable[[str], None] = print
          ) -> tuple[relax.VMExecutable, dict]:
    """Compile the lowered module for ``target`` as its backend does (``targets.backend``);
    returns it and which kernels were tuned."""
    return backend_for(target).build(lowered.mod, target, tuning_log, expect, log)


def export_library(module, target: tvm.target.Target, path: str,
                   workspace: str | None = None) -> None:
    """Write a built ``module`` as the shared library ``path`` for ``target``, as its backend
    does (device code compiled here, linked for the target's machine); the object files go
    under ``workspace`` (default: a temporary directory)."""
    backend_for(target).export_library(module, target, path, workspace)


def compile_model(model: torch.nn.Module, arch: Arch, target: str | None, out_dir: str,
                  log: Callable[[str], None] = print, buckets=None,
                  tuning_log: str | None = None, emb_quant: str | None = None,
                  precision: str = "fp32", mlp_quant: str | None = None,
                  calibration=None, progress: bool = False) -> Manifest:
    """Compile ``model`` for ``target`` into the artifact directory ``out_dir``; return its
    manifest. ``buckets``: static batch sizes compiled beside the symbolic batch (default:
    the tuning log's, else ``DEFAULT_BUCKETS``); ``tuning_log``: a ``dlrm-tune`` directory
    whose schedules are replayed; ``emb_quant``: "int8" stores the tables row-wise quantised;
    ``precision``: the dense layers' and interaction's type; ``mlp_quant`` "int8": int8 dense
    layers calibrated on ``calibration`` (batches of (dense_x, lS_o, [lS_i_k]), the reference
    layout); ``progress``:
    each stage's seconds, and the bytes written, shown on stderr while it runs."""
    tgt = parse_target(target)
    backend = backend_for(tgt)
    backend.check_options(tuning_log=tuning_log)
    backend.check_tools(tgt)   # before the build: a missing cross compiler or nvcc fails fast
    if buckets is None:
        buckets = read_log_manifest(tuning_log)["buckets"] if tuning_log else DEFAULT_BUCKETS
    buckets = checked_buckets(buckets)
    lowered = prepare(model, arch, tgt, buckets, log, emb_quant, progress, precision=precision,
                      mlp_quant=mlp_quant, calibration=calibration)
    executable, summary = _stage(log, "build", progress, build, lowered, tgt, tuning_log,
                                 tuning_identity(arch, tgt), log)
    inputs, dims = input_spec(arch)
    if lowered.num_inputs != len(inputs):
        raise BuildError(f"the lowered model takes {lowered.num_inputs} inputs, expected "
                         f"{len(inputs)}")
    manifest = Manifest(
        arch=arch.to_dict(), entry="main", inputs=inputs, dynamic_dims=dims,
        output={"name": "pred", "dtype": "float32", "shape": ["batch", 1]},
        target=target_record(target, tgt), buckets={str(b): entry_name(b) for b in buckets},
        transform_params=TRANSFORM_PARAMS, emb_quant=emb_quant, precision=precision,
        checked_inputs=backend.device == "cpu",     # the CPU bag kernel checks its inputs
        mlp_quant=mlp_quant, tuning_log=None if tuning_log is None else {
            "path": str(tuning_log), "tuned": summary["tuned"], "default": summary["default"]})
    total = sum(p.nbytes for p in lowered.params)
    with tqdm(total=total, desc="[dlrmc] write", unit="B", unit_scale=True, leave=False,
              disable=not progress) as bar:
        return _stage(log, "write", False, write_artifact, out_dir,
                      lambda path, workspace: export_library(executable, tgt, path, workspace),
                      zip(lowered.param_names, lowered.params), manifest, bar.update, total)
