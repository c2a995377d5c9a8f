"""What the machine can do, measured by dlrmc itself: the fp32 FMA peak (a register-only loop
of independent vector FMA chains, built for the target with TVM) and each dense layer's rate
in our kernel, as its share of that peak (``dlrm-bench`` prints both)."""


import numpy as np
import tvm
from tvm.script import tirx as T

from ..schedules import work_rule
from ..schedules.dense import dense_kernel, dense_narrow_kernel, narrow, pack_kernel
from ..targets.knobs import cpu_knobs

CHAINS = 12          # independent accumulators: enough to hide the FMA latency on x86 and Arm
ITERATIONS = 1 << 16   # FMAs per chain per call (milliseconds: the thread pool's wake-up is noise)


def _peak_kernel(tasks: int, lanes: int):
    width = CHAINS * lanes

    @T.prim_func(s_tir=True)
    def peak(out: T.Buffer((tasks, width), "float32"), x: T.Buffer((width,), "float32")):
        for t in T.parallel(tasks):
            with T.sblock("task"):
                vt = T.axis.spatial(tasks, t)
                acc = T.sblock_alloc_buffer((width,), "float32", scope="local")
                for i in T.vectorized(width):
                    acc[i] = x[i]
                for _ in range(ITERATIONS):
                    for c in T.unroll(CHAINS):
                        for i in T.vectorized(lanes):
                            acc[c * lanes + i] = acc[c * lanes + i] * T.float32(0.9999) + \
                                T.float32(0.0001)
                for i in T.vectorized(width):
                    out[vt, i] = acc[i]

    return peak


def fma_peak(target: tvm.target.Target, threads: int) -> float:
    """fp32 FLOP/s of ``threads`` cores running independent vector FMA chains."""
    lanes = cpu_knobs(target).lanes
    lib = tvm.compile(tvm.IRModule({"main": _peak_kernel(threads, lanes)}), target)
    out = tvm.runtime.empty((threads, CHAINS * lanes), "float32")
    x = tvm.runtime.tensor(np.ones(CHAINS * lanes, np.float32))
    seconds = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=5)(out, x).results
    return threads * ITERATIONS * CHAINS * lanes * 2 / min(seconds)


def dense_layers(arch) -> list[tuple[str, int, int]]:
    """(name, N, K) of every dense layer of the model: bottom and top MLPs, cross layers."""
    layers = []
    for name, widths in (("bot", arch.mlp_bot), ("top", arch.ln_top)):
        layers += [(f"{name} {k}->{n}", n, k) for k, n in zip(widths[:-1], widths[1:])]
    width, rank = arch.top_input_width, arch.dcn_low_rank
    for layer in range(arch.dcn_layers):
        layers += [(f"cross{layer} V {width}->{rank}", rank, width),
                   (f"cross{layer} W {rank}->{width}", width, rank)]
    return layers


def layer_rate(target: tvm.target.Target, n: int, k: int, batch: int) -> float:
    """FLOP/s of our dense kernel for one [batch, k] x [k, n] layer, scheduled by default
    (the narrow kernel for a layer the model runs on it, ``dlrmc.schedules.dense.narrow``)."""
    knobs = cpu_knobs(target)
    rng = np.random.default_rng(0)
    w = tvm.runtime.tensor(rng.standard_normal((n, k)).astype(np.float32))
    if narrow(n, knobs.lanes):
        func = dense_narrow_kernel(n, k, "relu", knobs.lanes, knobs.parallel_min_macs, batch)
    else:
        nr = knobs.nr if n > knobs.lanes else knobs.lanes
        func = dense_kernel(n, k, "relu", knobs.mr, nr, knobs.parallel_min_macs, batch,
                            knobs.parallel_min_bytes)
        pack = tvm.compile(tvm.IRModule({"main": pack_kernel(n, k, nr).with_attr(
            "global_symbol", "main")}), target)
        packed = tvm.runtime.empty((-(-n // nr), k, nr), "float32")
        pack["main"](w, packed)
        w = packed
    func = work_rule.apply_default(func).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target)
    x = tvm.runtime.tensor(rng.standard_normal((batch, k)).astype(np.float32))
    bias = tvm.runtime.tensor(np.zeros(n, np.float32))
    y = tvm.runtime.empty((batch, n), "float32")
    seconds = lib.mod.time_evaluator("main", tvm.cpu(), number=5, repeat=5)(x, w, bias, y).results
    return 2 * batch * n * k / min(seconds)


def layer_table(arch, target: tvm.target.Target, batch: int, peak: float) -> str:
    """Each dense layer's time, rate and share of ``peak`` at ``batch``, as Markdown."""
    lines = [f"| dense layer (B={batch}) | GFLOP/s | share of the FMA peak |", "|---|---|---|"]
    for name, n, k in dense_layers(arch):
        rate = layer_rate(target, n, k, batch)
        lines.append(f"| {name} | {rate / 1e9:,.1f} | {rate / peak:.0%} |")
    return "\n".join(lines)
