"""The GPU kernels' checks: our CUDA kernels over many configurations, in one library, against
the numpy oracles (``dlrmc.frontend.ops``).

``build(target, bind)`` compiles every case of ``CASES`` into one module, each as its own
function (``bind=False``: the same loops serially, for a CPU target). ``run(lib, device)``
feeds every case seeded random inputs on ``device`` and returns each one's largest
difference from its oracle. The GPU check (``bench.gpu``) builds the CUDA library here and
runs it on the GPU; the suite runs the CPU build of the same cases. Running needs TVM's
runtime only; building needs its compiler.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 1e-4     # max |kernel - oracle|, relative to max(1, |oracle|)


def _bags(dim, mode="sum", weighted=False, index_dtype="int64", tables=3, batch=None, n=37,
          last=False, pad=None, bag_max=5):
    name = (f"bags_d{dim}_{mode}{'_w' if weighted else ''}_{index_dtype}_t{tables or 1}"
            f"_{'b' + str(batch) if batch else 'n' + str(n)}{'_last' if last else ''}"
            f"{'_pad' + str(pad) if pad is not None else ''}")
    return {"name": name, "kind": "bags", "dim": dim, "mode": mode, "weighted": weighted,
            "index_dtype": index_dtype, "tables": tables, "batch": batch,
            "n": batch or n, "last": last, "pad": pad, "bag_max": bag_max}


def _interaction(features, dim=16, itself=False, prepend=True, batch=None, n=9):
    name = (f"inter_f{features}_d{dim}{'_self' if itself else ''}{'_x' if prepend else ''}"
            f"_{'b' + str(batch) if batch else 'n' + str(n)}")
    return {"name": name, "kind": "interaction", "features": features, "dim": dim,
            "itself": itself, "prepend": prepend, "batch": batch, "n": batch or n}


CASES = (
    [_bags(d, m, w) for d in (1, 3, 16, 64, 200)
     for m, w in (("sum", False), ("sum", True), ("mean", False), ("max", False))]
    + [_bags(16, "sum", index_dtype="int32"), _bags(16, "sum", batch=64),
       _bags(16, "sum", tables=26, n=2053, bag_max=2),            # many blocks, Kaggle tables
       _bags(8, "mean", tables=None, n=4, last=True, pad=3),
       _bags(8, "sum", weighted=True, tables=None, n=50, pad=0)]
    + [_interaction(f, 16, s, p) for f in (2, 5, 27, 40) for s in (False, True)
       for p in (False, True)]
    + [_interaction(27, 16, batch=64), _interaction(27, 16, n=2053), _interaction(4, 7, True)]
)


def build(target, bind: bool = True):
    """Every case compiled for ``target`` into one module (``tvm.compile``'s result)."""
    import tvm

    from ..schedules.gpu import dot_interaction_gpu_kernel, embedding_bags_gpu_kernel

    funcs = {}
    for c in CASES:
        if c["kind"] == "bags":
            rows = None if c["tables"] is None else tuple(range(c["tables"]))
            func = embedding_bags_gpu_kernel(c["dim"], c["mode"], c["weighted"],
                                             c["index_dtype"], c["last"], c["pad"], rows,
                                             c["batch"], bind=bind)
        else:
            func = dot_interaction_gpu_kernel(c["features"], c["dim"], c["itself"],
                                              c["prepend"], c["batch"], "fp32", bind=bind)
        funcs[c["name"]] = func.with_attr("global_symbol", c["name"])
    return tvm.compile(tvm.IRModule(funcs), target)


def _bag_data(c: dict, rng):
    """Inputs in the kernel's argument order, and the oracle's outputs."""
    from ..frontend import ops as ref

    tables, n, dim = c["tables"] or 1, c["n"], c["dim"]
    rows = rng.integers(1, 60, tables)
    weights = [rng.standard_normal((r, dim)).astype(np.float32) for r in rows]
    sizes = rng.integers(0, c["bag_max"] + 1, (tables, n))
    starts = np.concatenate([np.zeros((tables, 1), np.int64), np.cumsum(sizes, 1)], 1)
    indices = [rng.integers(0, r, int(s.sum())).astype(c["index_dtype"])
               for r, s in zip(rows, sizes)]
    psw = ([rng.standard_normal(len(i)).astype(np.float32) for i in indices]
           if c["weighted"] else [])
    bag_starts = starts if c["last"] else starts[:, :-1]     # the last end too, or not
    offsets = bag_starts[0] if c["tables"] is None else bag_starts
    want = [ref.embedding_bag(weights[k], indices[k], bag_starts[k], c["mode"],
                              psw[k] if c["weighted"] else None, c["last"], c["pad"])
            for k in range(tables)]
    return (weights + indices + [offsets.astype(c["index_dtype"])] + psw, want)


def _interaction_data(c: dict, rng):
    from ..frontend import ops as ref

    t = rng.standard_normal((c["n"], c["features"], c["dim"])).astype(np.float32)
    return [t], [ref.dot_interaction(t, c["itself"], c["prepend"])]


def run(lib, device, cases=CASES) -> dict[str, float | str]:
    """Each case's largest difference from its oracle, relative to max(1, |oracle|), or the
    error its call raised, run from ``lib`` (``build``'s module, or the library it was
    exported to, loaded) on ``device``."""
    import tvm

    worst: dict[str, float | str] = {}
    for seed, c in enumerate(cases):
        rng = np.random.default_rng(seed)
        inputs, want = (_bag_data if c["kind"] == "bags" else _interaction_data)(c, rng)
        outs = [tvm.runtime.tensor(np.full(w.shape, np.nan, np.float32), device) for w in want]
        try:
            lib[c["name"]](*[tvm.runtime.tensor(a, device) for a in inputs], *outs)
        except Exception as e:  # noqa: BLE001 - reported per case, the others still run
            worst[c["name"]] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            continue
        worst[c["name"]] = max(float(np.max(np.abs(o.numpy() - w) / np.maximum(1, np.abs(w))))
                               if w.size else 0.0 for o, w in zip(outs, want))
    return worst


def failures(worst: dict[str, float | str]) -> list[str]:
    """The cases beyond ``TOLERANCE`` or that raised (NaN, from an output left unwritten,
    counts)."""
    return [f"{k}: {v if isinstance(v, str) else format(v, '.3g')}" for k, v in worst.items()
            if isinstance(v, str) or not v <= TOLERANCE]
