"""CPU targets (``llvm``: x86 and aarch64): our TIR kernels scheduled with the target's knobs
(``knobs.py``), MetaSchedule tuning logs replayed, linked for the target's machine
(``toolchain.py``); the runtime checks the machine and its CPU features before running."""

from __future__ import annotations

import tvm
from tvm.target import Target, codegen

from .backend import Backend, register
from .toolchain import linker

# LLVM feature names whose absence makes code crash with SIGILL, and what Linux's
# /proc/cpuinfo calls them.
CPUINFO_FLAGS = {
    "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile", "sve": "sve", "sve2": "sve2",
    "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16",
}


class CpuBackend(Backend):
    name = "cpu"
    device = "cpu"
    lowering = "cpu"
    refuses: dict[str, str] = {}

    def matches(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def check_tools(self, target: Target) -> None:
        linker(target)             # a missing cross compiler fails before the build

    def requirements(self, target: Target) -> dict:
        """The machine and the instruction-set flags (as /proc/cpuinfo names them) the code
        uses, so a deployment can refuse instead of dying of SIGILL."""
        triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
        feats = set(codegen.llvm_get_cpu_features(target))
        return {**super().requirements(target), "machine": triple.split("-")[0],
                "cpu_flags": sorted(CPUINFO_FLAGS[f] for f in feats if f in CPUINFO_FLAGS)}

    def schedule(self, mod, target, tuning_log, expect, log):
        """Our kernels scheduled (from the tuning log, else by default), the weight-only
        work lifted into ``transform_params``, Relax's ``zero`` pipeline: the module ready for
        TVM's lowering, and the tuning summary."""
        from tvm import relax

        from ..schedules.tuning.log import schedule_kernels

        mod, summary = schedule_kernels(mod, target, tuning_log, expect, warn=log)
        mod = relax.transform.LiftTransformParams(shared_transform=True)(mod)
        return relax.get_pipeline("zero")(mod), summary

    def build(self, mod, target, tuning_log, expect, log):
        mod, summary = self.schedule(mod, target, tuning_log, expect, log)
        return tvm.compile(mod, target), summary

    def export_library(self, module, target, path, workspace=None) -> None:
        # fcompile None: this machine's g++
        module.export_library(path, fcompile=linker(target), workspace_dir=workspace)


register(CpuBackend())
