"""From a torch DLRM to an artifact directory: export, lower, build, write.

Each stage is timed and reported through ``log``. ``build`` lifts everything that depends
only on the weights (the dense layers' weight packing) into ``main_transform_params``, which
the runtime calls once at load; then Relax's ``zero`` pipeline (legalize, fuse) and TVM's
lowering. Our kernels arrive already scheduled from ``dlrmc.schedules``.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Callable

import torch
import tvm
from tvm import relax

from ..artifact import write_artifact
from ..frontend.arch import Arch
from ..frontend.export import export_model
from ..targets import parse_target, requirements, resolved
from .lower import Lowered, lower


class BuildError(ValueError):
    """A model or target dlrmc cannot build."""


def input_spec(arch: Arch) -> tuple[list[dict], dict]:
    """The artifact's inputs (reference layout, index list spelled out) and dynamic dims."""
    inputs = [{"name": "dense_x", "dtype": "float32", "shape": ["batch", arch.num_dense]},
              {"name": "lS_o", "dtype": "int64", "shape": [arch.num_tables, "batch"]}]
    dims = {"batch": [1, None]}
    for k in range(arch.num_tables):
        inputs.append({"name": f"lS_i_{k}", "dtype": "int64", "shape": [f"indices_{k}"]})
        dims[f"indices_{k}"] = [0, None]
    return inputs, dims


TRANSFORM_PARAMS = "main_transform_params"


def build(lowered: Lowered, target: tvm.target.Target) -> relax.VMExecutable:
    """Compile the lowered module for ``target``; it gains ``main_transform_params``."""
    if target.kind.name != "llvm":
        raise BuildError(f"dlrmc does not build for target kind {target.kind.name!r} yet; "
                         "use an llvm target")
    mod = relax.transform.LiftTransformParams()(lowered.mod)
    mod = relax.get_pipeline("zero")(mod)
    return tvm.compile(mod, target)


def compile_model(model: torch.nn.Module, arch: Arch, target: str | None, out_dir: str,
                  log: Callable[[str], None] = print) -> dict:
    """Compile ``model`` for ``target`` into the artifact directory ``out_dir``; return its manifest."""
    tgt = parse_target(target)

    def stage(name, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        log(f"[dlrm-compile] {name:<6} {time.perf_counter() - t0:7.2f} s")
        return result

    ep = stage("export", export_model, model, arch)
    lowered = stage("lower", lower, ep, tgt)
    del ep
    executable = stage("build", build, lowered, tgt)
    inputs, dims = input_spec(arch)
    if lowered.num_inputs != len(inputs):
        raise BuildError(f"the lowered model takes {lowered.num_inputs} inputs, expected "
                         f"{len(inputs)}")
    manifest = {
        "dlrmc_version": version("dlrmc"),
        "tvm_version": tvm.__version__,
        "arch": arch.to_dict(),
        "entry": "main",
        "transform_params": TRANSFORM_PARAMS,
        "inputs": inputs,
        "dynamic_dims": dims,
        "output": {"name": "pred", "dtype": "float32", "shape": ["batch", 1]},
        "target": {"string": target or "host", "resolved": resolved(tgt),
                   "requires": requirements(tgt)},
        "tuning_log": None,
    }
    return stage("write", write_artifact, out_dir, executable.export_library,
                 zip(lowered.param_names, lowered.params), manifest)
