"""Measuring tuning candidates: valid inputs, our build function, local and RPC runners."""

from __future__ import annotations

import sys
import types

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms


def _arguments(args_info) -> list[np.ndarray]:
    """Inputs for one measurement: random floats; valid ones for our embedding kernels, whose
    arguments are tables [V_k, D] (float32, or quantised uint8 rows), then the index arrays
    (one per table, or one for all in the flat layout), then the offsets (equal bags), then
    any pooling weights; every index inside every table it may be read for."""
    rng = np.random.default_rng(0)
    infos = [(str(i[1]), [int(s) for s in i[2]]) for i in args_info]
    lead = 0
    while lead < len(infos) and infos[lead][0] in ("float32", "uint8") \
            and len(infos[lead][1]) == 2:
        lead += 1
    ints = [p for p in range(lead, len(infos)) if infos[p][0].startswith("int")] if lead else []
    rows = [max(infos[k][1][0], 1) for k in range(lead)]
    index_pos = ints[:-1]
    count = infos[index_pos[0]][1][0] if index_pos else 0
    arrays = []
    for pos, (dtype, shape) in enumerate(infos):
        if dtype.startswith("float") and np.prod(shape) > 1 << 22:   # big tables: any values
            arrays.append(np.ones(shape, dtype))
        elif dtype.startswith("float"):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == "uint8":
            arrays.append(rng.integers(0, 256, shape).astype(dtype))
        elif pos in index_pos:
            m = index_pos.index(pos)
            high = rows[m] if len(index_pos) == lead else min(rows)
            arrays.append(rng.integers(0, high, shape).astype(dtype))
        elif ints and pos == ints[-1]:
            bags = max(shape[-1] - (1 if len(shape) == 1 and shape[-1] > 1 else 0), 1)
            starts = np.minimum(np.arange(shape[-1]) * max(count // bags, 1), count)
            arrays.append(np.broadcast_to(starts, shape).astype(dtype).copy())
        else:
            arrays.append(np.zeros(shape, dtype))
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


def skip_tensor_intrinsics() -> None:
    """TuneContext imports ``tvm.s_tir.tensor_intrin`` too (see ``build_kernel``); ours never
    tensorize, so stand an empty module in for it unless something imported it already."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name, "not loaded by dlrmc: no tensorization")


def _measure_on_every_core() -> None:
    """Runner workers' initializer: TVM's default thread count is half the cores on x86;
    measure with all of them, as the runtime runs (``dlrmc.runtime.set_threads``)."""
    from ...runtime.model import set_threads

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
