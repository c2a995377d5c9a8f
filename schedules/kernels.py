"""Our kernels by name, each tagged with the recipe that built it.

``make(name, **args)`` calls the named generator and records ``{"kernel", "args"}`` in the
PrimFunc's ``dlrmc.kernel`` attribute, so a later stage can rebuild the same kernel at a
static batch (``at_batch``: what a batch bucket runs and MetaSchedule tunes) without knowing
which converter made it.
"""

from __future__ import annotations

import json

import tvm

from .concat import concat_kernel
from .dense import dense_kernel, dense_narrow_kernel
from .dense_lowp import dense_lowp_kernel
from .embedding_bag import embedding_bags_kernel
from .gpu import dot_interaction_gpu_kernel, embedding_bags_gpu_kernel
from .interaction import dot_interaction_kernel

KERNEL_ATTR = "dlrmc.kernel"
GENERATORS = {
    "embedding_bags": embedding_bags_kernel,
    "dot_interaction": dot_interaction_kernel,
    "concat_rows": concat_kernel,
    "dense": dense_kernel,
    "dense_narrow": dense_narrow_kernel,
    "dense_lowp": dense_lowp_kernel,
    "embedding_bags_gpu": embedding_bags_gpu_kernel,
    "dot_interaction_gpu": dot_interaction_gpu_kernel,
}


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def make(name: str, **args) -> tvm.tirx.PrimFunc:
    """The kernel ``GENERATORS[name](**args)``, tagged with its recipe."""
    func = GENERATORS[name](**{k: _hashable(v) for k, v in args.items()})
    recipe = json.dumps({"kernel": name, "args": args}, sort_keys=True)
    return func.with_attr(KERNEL_ATTR, recipe)


def recipe(func) -> dict | None:
    """The recipe a kernel was made from, or None for a function that is not ours."""
    if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None \
            or KERNEL_ATTR not in func.attrs:
        return None
    return json.loads(str(func.attrs[KERNEL_ATTR]))


PREFETCH_CHOICES = (0, 4, 16)   # rows ahead an embedding kernel may prefetch


def variants(r: dict, knobs) -> list[dict]:
    """The discrete knobs of a kernel worth measuring, as argument overrides (``{}`` is the
    kernel as lowered): GEMM micro-tile heights that fit the target's registers, and the
    embedding kernels' prefetch distance. Each override is its own MetaSchedule task."""
    a = r["args"]
    if r["kernel"] in ("dense", "dense_lowp"):
        return [{} if m == a["mr"] else {"mr": m} for m in knobs.mr_choices(a["nr"])] or [{}]
    if r["kernel"] == "embedding_bags":
        return [{} if d == a.get("prefetch", 0) else {"prefetch": d} for d in PREFETCH_CHOICES]
    return [{}]


def with_args(r: dict, override: dict) -> tvm.tirx.PrimFunc:
    """The kernel of recipe ``r`` with some arguments overridden."""
    return make(r["kernel"], **{**r["args"], **override})


def at_batch(func: tvm.tirx.PrimFunc, batch: int, knobs=None) -> tvm.tirx.PrimFunc | None:
    """The same kernel rebuilt for a static ``batch``; None when ``func`` is not ours or
    does not depend on the batch. With the CPU target's ``knobs`` an fp32 dense kernel
    takes the micro-tile height that suits the batch (``CpuKnobs.mr_for_batch``)."""
    r = recipe(func)
    if r is None or "batch" not in r["args"]:
        return None
    args = {**r["args"], "batch": int(batch)}
    if knobs is not None and r["kernel"] == "dense":
        args["mr"] = knobs.mr_for_batch(args["nr"], int(batch), args["mr"])
    return make(r["kernel"], **args)
