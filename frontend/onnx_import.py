"""DLRMs that arrive as ONNX files: recognise the DLRM in the graph, rebuild it, prove it.

Exporters spell DLRM differently: facebookresearch/dlrm's ``--save-onnx`` (TorchScript
exporter, opset 11) and ``torch.onnx.export(dynamo=True)`` turn each EmbeddingBag into a Loop
over bags (Slice of the indices, Gather of table rows, ReduceSum), the ATen-fallback export
into an ``ATen`` node, fixed-size bags into Gather + ReduceSum; the interaction's
``Z[:, li, lj]`` becomes a Gather (or GatherND) on the flattened Gram matrix. Rather than
pattern-match each spelling op by op, we read the model's structure from what every spelling
shares, then check the result against the ONNX graph itself:

- tables: 2-D float initializers that a Gather (at any depth, Loop bodies included) or an
  ATen ``embedding_bag`` reads rows of, in the order the graph first uses them; pooling from
  the Reduce op beside the Gather (sum / mean / max);
- dense layers: Gemm (or MatMul + Add) with initializer weights; a layer whose input depends
  on no table is in the bottom MLP, the rest in the top MLP, in graph order;
- interaction: ``dot`` when a MatMul multiplies two computed tensors (the Gram matrix), else
  ``cat``; whether the diagonal is kept follows from the top MLP's input width.

- inputs: any of ``LAYOUTS`` (``input_layout``): the reference's ``--save-onnx`` writes
  offsets and indices as one tensor each or as one input per table, as its batches held
  them; fixed-size bags take one [B, L] index tensor per table.

The rebuilt model is our ``DLRM`` (the reference's layout) with the initializers as weights,
so an ONNX model gets the same export, kernels, tuning and artifact as a torch one. Before it
is used, it and the ONNX graph (run by ``onnx.reference.ReferenceEvaluator``, with a numpy
implementation of the ATen ``embedding_bag`` node) predict a small random batch (bags never
empty: there the exporters' semantics differ from PyTorch's); any disagreement raises
``NotADlrm``, and ``dlrm-compile`` then takes the generic path (``dlrmc.compiler.generic``).
Weights stored as external data (tables over 2 GB need it) are read from beside the file.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .arch import Arch
from .model import DLRM
from .ops import Pooling, num_pairs

REDUCE_MODES = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max"}
VERIFY_TOLERANCE = 1e-4
# The check batch stays small whatever sizes the graph declares (a static batch of 10**6
# would make it gigabytes); sizes above these are cut down to them.
VERIFY_MAX_BATCH = 64
VERIFY_MAX_COUNT = 256


class OnnxImportError(ValueError):
    """An ONNX file dlrmc cannot read, with the reason."""


class NotADlrm(OnnxImportError):
    """A valid ONNX graph in which dlrmc does not recognise a DLRM (``unrecognised``: the
    nodes that read large 2-D initializers in a way dlrmc does not know)."""

    def __init__(self, message: str, unrecognised: list[str] | None = None):
        super().__init__(message)
        self.unrecognised = unrecognised or []


def unrecognised_readers(model: onnx.ModelProto) -> list[str]:
    """"node 'N' (Op) reads 'W' [R, C]" for every node outside the recognised table and
    dense-layer encodings that reads a 2-D float initializer (where tables would be)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    known = {t for t, _ in _find_tables(model, inits)}
    known |= {ly["node"].input[1] for ly in _dense_layers(model, inits)}
    out = []
    for node, _ in _walk(model.graph):
        for name in node.input:
            arr = inits.get(name)
            if arr is not None and arr.ndim == 2 and arr.dtype == np.float32 and name not in known:
                out.append(f"node {node.name or node.output[0]!r} ({node.op_type}) reads "
                           f"{name!r} {list(arr.shape)}")
    return out


def load_onnx(path: str) -> onnx.ModelProto:
    """The model with its external data, checked by ONNX's own checker."""
    if not os.path.isfile(path):
        raise OnnxImportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage
        raise OnnxImportError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from e
    base = os.path.dirname(os.path.abspath(path))
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in init.external_data}.get("location", "")
            if not os.path.isfile(os.path.join(base, where)):
                raise OnnxImportError(f"{path}: initializer {init.name!r} is stored in external "
                                      f"data file {where!r}, which is missing from {base}")
    try:
        onnx.load_external_data_for_model(model, base)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise OnnxImportError(f"{path} is not a valid ONNX model: {e}") from e
    return model


def _walk(graph, depth=0):
    """(node, the graph holding it) for every node, subgraphs (Loop/If bodies) included."""
    for node in graph.node:
        yield node, graph
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attr.g, depth + 1)


def _find_tables(model, inits) -> list[tuple[str, str]]:
    """(initializer name, pooling mode) of each embedding table, in first-use order."""
    tables, seen = [], set()
    for node, graph in _walk(model.graph):
        name = node.input[0] if node.input else ""
        arr = inits.get(name)
        is_bag = node.op_type == "Gather" or (node.op_type == "ATen" and any(
            a.name == "operator" and b"embedding_bag" in a.s for a in node.attribute))
        if not is_bag or arr is None or arr.ndim != 2 or arr.dtype != np.float32 or name in seen:
            continue
        if node.op_type == "Gather" and any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        modes = {REDUCE_MODES[n.op_type] for n in graph.node if n.op_type in REDUCE_MODES}
        if node.op_type == "ATen":
            mode_attr = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            modes = {Pooling.of(mode_attr.get("mode", 0)).label}
        seen.add(name)
        tables.append((name, modes.pop() if len(modes) == 1 else "sum"))
    return tables


def _dense_layers(model, inits) -> list[dict]:
    """Gemm / MatMul(+Add) layers with initializer weights: W [N, K], bias, input name."""
    layers = []
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            attrs = {a.name: (a.i if a.type == onnx.AttributeProto.INT else a.f)
                     for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                    or attrs.get("beta", 1.0) != 1.0:
                raise NotADlrm(f"Gemm node {node.name!r}: only alpha = beta = 1 without "
                                      "transA is a dense layer dlrmc knows")
            w = inits[node.input[1]]
            w = w if attrs.get("transB", 0) else w.T
            bias = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            layers.append({"node": node, "input": node.input[0], "weight": w, "bias": bias})
        elif node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            bias = None
            for c in consumers.get(node.output[0], []):
                other = [i for i in c.input if i != node.output[0]]
                if c.op_type == "Add" and other and other[0] in inits:
                    bias = inits[other[0]]
            layers.append({"node": node, "input": node.input[0], "weight": inits[node.input[1]].T,
                           "bias": bias})
    return layers


def _table_dependent(model, table_names: set) -> set:
    """Names of main-graph tensors computed from any table (directly or via a subgraph)."""
    dependent = set()
    for node in model.graph.node:
        reads = set(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                reads |= {i for n, _ in _walk(attr.g) for i in n.input}
        if reads & (table_names | dependent):
            dependent.update(node.output)
    return dependent


def _gram_matmul(model, inits) -> bool:
    return any(n.op_type == "MatMul" and not (set(n.input) & set(inits))
               for n in model.graph.node)


def recognise(model: onnx.ModelProto) -> tuple[Arch, dict[str, np.ndarray]]:
    """The DLRM architecture of ``model`` and its weights in our DLRM's state_dict names."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tables = _find_tables(model, inits)
    if not tables:
        ops = ", ".join(f"{op} x{n}" for op, n in Counter(
            n.op_type for n in model.graph.node).most_common(8))
        raise NotADlrm("no embedding tables found (no Gather or ATen embedding_bag "
                              "reads rows of a 2-D float initializer); dlrmc compiles DLRM-like "
                              f"graphs, this one has {ops}")
    dims = {inits[t].shape[1] for t, _ in tables}
    modes = {m for _, m in tables}
    if len(dims) != 1 or len(modes) != 1:
        raise NotADlrm(f"tables differ in width {sorted(dims)} or pooling {sorted(modes)}"
                              "; dlrmc's DLRM has one of each")
    dependent = _table_dependent(model, {t for t, _ in tables})
    layers = _dense_layers(model, inits)
    bottom = [ly for ly in layers if ly["input"] not in dependent]
    top = [ly for ly in layers if ly["input"] in dependent]
    if not bottom or not top:
        raise NotADlrm(f"found {len(bottom)} bottom and {len(top)} top dense layers; a "
                              "DLRM has both")
    for part in (bottom, top):
        for a, b in zip(part, part[1:]):
            if a["weight"].shape[0] != b["weight"].shape[1]:
                raise NotADlrm(f"dense layers {a['node'].name!r} -> {b['node'].name!r} "
                                      "do not chain; not a DLRM MLP")
    dim = int(dims.pop())
    mlp_bot = (int(bottom[0]["weight"].shape[1]),) + tuple(int(ly["weight"].shape[0])
                                                           for ly in bottom)
    mlp_top = tuple(int(ly["weight"].shape[0]) for ly in top)
    top_in = int(top[0]["weight"].shape[1])
    op = "dot" if _gram_matmul(model, inits) else "cat"
    itself = False
    if op == "dot":
        f = len(tables) + 1
        pairs = top_in - mlp_bot[-1]
        if pairs not in (num_pairs(f, False), num_pairs(f, True)):
            raise NotADlrm(f"the top MLP takes {top_in} inputs, which no dot interaction "
                                  f"of {f} features of width {mlp_bot[-1]} gives")
        itself = pairs == num_pairs(f, True)
    try:
        arch = Arch(dim, tuple(int(inits[t].shape[0]) for t, _ in tables), mlp_bot, mlp_top,
                    interaction_op=op, interaction_itself=itself, pooling=modes.pop())
    except ValueError as e:
        raise NotADlrm(f"the graph's DLRM is not consistent: {e}") from e
    state = {f"emb_l.{k}.weight": inits[t] for k, (t, _) in enumerate(tables)}
    for prefix, part in (("bot_l", bottom), ("top_l", top)):
        for i, ly in enumerate(part):
            state[f"{prefix}.{2 * i}.weight"] = np.ascontiguousarray(ly["weight"], np.float32)
            bias = ly["bias"] if ly["bias"] is not None else np.zeros(ly["weight"].shape[0])
            state[f"{prefix}.{2 * i}.bias"] = np.asarray(bias, np.float32).reshape(-1)
    return arch, state


LAYOUTS = {
    "offsets": "dense_x, offsets [T, B], one 1-D index list per table",
    "stacked": "dense_x, offsets [T, B], indices [T, N] (every table N indices)",
    "offset-lists": "dense_x, one [B] offset list per table, one index list per table",
    "fixed": "dense_x, one [B, L] index tensor per table (L indices a bag)",
}


def graph_inputs(model: onnx.ModelProto) -> list:
    """The graph's inputs that are not initializers (what a caller feeds)."""
    return [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]


def input_layout(model: onnx.ModelProto, num_tables: int) -> str:
    """How the graph takes its indices (``LAYOUTS``). facebookresearch/dlrm ``--save-onnx``
    names them dense_x, offsets or offsets_K, indices or indices_K after whether its batches
    held tensors or lists. Our artifact always takes the reference layout; a fixed-bag batch
    is lS_o[k] = arange(B) * L, lS_i[k] = idx_k.ravel()."""
    ranks = [len(i.type.tensor_type.shape.dim) for i in graph_inputs(model)]
    t = num_tables
    if len(ranks) == 2 + t and ranks[1] == 2 and all(r == 1 for r in ranks[2:]):
        return "offsets"
    if len(ranks) == 3 and ranks[1:] == [2, 2]:
        return "stacked"
    if len(ranks) == 1 + 2 * t and all(r == 1 for r in ranks[1:]):
        return "offset-lists"
    if len(ranks) == 1 + t and all(r == 2 for r in ranks[1:]):
        return "fixed"
    raise NotADlrm(f"the graph takes {len(ranks)} inputs of ranks {ranks}; a DLRM export of "
                   f"{t} tables takes " + "; or ".join(LAYOUTS.values()))


def _bags(rng, batch: int, count: int) -> np.ndarray:
    """Start offsets of ``batch`` bags over ``count`` indices; none empty where the count
    allows (exporters disagree on empty bags: ReduceMean of nothing is NaN in ONNX, 0 in
    PyTorch)."""
    cuts = (np.sort(rng.choice(np.arange(1, count), batch - 1, replace=False))
            if count >= batch else np.sort(rng.integers(0, count + 1, batch - 1)))
    return np.concatenate([[0], cuts]).astype(np.int64)


def _verification_feed(model, arch: Arch, seed: int = 0) -> tuple[dict, tuple, list[str]]:
    """A small random batch in the ONNX graph's inputs and in our model's, and the static
    sizes of the graph's inputs it had to cut (``VERIFY_MAX_BATCH``, ``VERIFY_MAX_COUNT``)."""
    rng = np.random.default_rng(seed)
    layout = input_layout(model, arch.num_tables)
    inputs = graph_inputs(model)
    t = arch.num_tables
    cut: list[str] = []

    def static(inp, axis, limit=VERIFY_MAX_COUNT):
        d = inp.type.tensor_type.shape.dim
        size = d[axis].dim_value if len(d) > axis and d[axis].HasField("dim_value") else None
        if size and size > limit:
            cut.append(f"{inp.name} (dimension {axis} declared {size})")
            return limit
        return size

    batch = static(inputs[0], 0, VERIFY_MAX_BATCH) or 3
    dense = rng.random((batch, arch.num_dense), dtype=np.float32)
    feed = {inputs[0].name: dense}
    if layout == "fixed":
        bags = [static(inputs[1 + k], 1) or 2 for k in range(t)]
        idx = [rng.integers(0, rows, (batch, bag)) for rows, bag in zip(arch.embedding_sizes, bags)]
        feed.update({inputs[1 + k].name: idx[k] for k in range(t)})
        offsets = np.stack([np.arange(batch) * bag for bag in bags]).astype(np.int64)
        return feed, (dense, offsets, [i.reshape(-1) for i in idx]), cut
    index_inputs = {"offsets": inputs[2:], "offset-lists": inputs[1 + t:]}.get(layout)
    if layout == "stacked":
        count = static(inputs[2], 1) or 2 * batch
        counts = [count] * t
    else:
        counts = [static(i, 0) or 2 * batch for i in index_inputs]
    offsets = np.stack([_bags(rng, batch, c) for c in counts])
    indices = [rng.integers(0, rows, c).astype(np.int64)
               for rows, c in zip(arch.embedding_sizes, counts)]
    if layout == "stacked":
        feed[inputs[1].name], feed[inputs[2].name] = offsets, np.stack(indices)
    elif layout == "offsets":
        feed[inputs[1].name] = offsets
        feed.update({i.name: idx for i, idx in zip(index_inputs, indices)})
    else:
        feed.update({inputs[1 + k].name: offsets[k] for k in range(t)})
        feed.update({i.name: idx for i, idx in zip(index_inputs, indices)})
    return feed, (dense, offsets, indices), cut


def _aten_op():
    """An ``onnx.reference`` implementation of the ATen-fallback ``embedding_bag`` node (domain
    org.pytorch.aten; inputs weight, indices, offsets[, per_sample_weights]; attributes mode,
    include_last_offset), so such graphs can be checked too."""
    from onnx.reference.op_run import OpRun

    class ATen(OpRun):
        op_domain = "org.pytorch.aten"

        def _run(self, weight, indices, offsets, *rest, **attrs):
            operator = attrs.get("operator") or getattr(self, "operator", b"")
            operator = operator.decode() if isinstance(operator, bytes) else str(operator)
            if "embedding_bag" not in operator:
                raise NotImplementedError(f"ATen operator {operator!r}")
            mode = int(getattr(self, "mode", 0) or 0)
            last = bool(getattr(self, "include_last_offset", 0) or 0)
            psw = rest[0] if rest and rest[0] is not None and len(rest[0]) else None
            bounds = list(offsets) if last else list(offsets) + [len(indices)]
            out = np.zeros((len(bounds) - 1, weight.shape[1]), np.float32)
            for b in range(len(bounds) - 1):
                rows = weight[indices[bounds[b]:bounds[b + 1]]].astype(np.float64)
                if psw is not None:
                    rows = rows * psw[bounds[b]:bounds[b + 1], None]
                if len(rows):
                    out[b] = (rows.sum(0), rows.mean(0), rows.max(0))[mode]
            empty = np.zeros(0, np.int64)
            return out, empty, empty, empty

    return ATen


def verify(model: onnx.ModelProto, dlrm: DLRM) -> float:
    """Max |ONNX graph - rebuilt model| on a random batch; an error above the tolerance."""
    from onnx.reference import ReferenceEvaluator

    feed, (dense, offsets, indices), cut = _verification_feed(model, dlrm.arch)
    try:
        want = ReferenceEvaluator(model, new_ops=[_aten_op()]).run(None, feed)[0]
    except Exception as e:  # noqa: BLE001 - e.g. an ATen node the evaluator cannot run
        if cut:
            raise OnnxImportError(
                f"the graph declares static sizes too large to check it with "
                f"({'; '.join(cut)}) and does not run on a check batch of "
                f"{len(dense)}: export it with a dynamic batch (torch.onnx.export's "
                "dynamic_axes or dynamic_shapes)") from e
        raise NotADlrm(f"could not run the ONNX graph to check the rebuilt DLRM "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    with torch.no_grad():
        ours = dlrm(torch.from_numpy(dense), torch.from_numpy(offsets),
                    [torch.from_numpy(i) for i in indices]).numpy()
    diff = float(np.abs(ours.reshape(-1) - np.asarray(want, np.float32).reshape(-1)).max())
    if not diff <= VERIFY_TOLERANCE:
        raise NotADlrm(f"the DLRM read from the graph disagrees with the graph itself "
                              f"(max difference {diff:.3g}); the graph is not one dlrmc can "
                              "rebuild")
    return diff


def model_from_onnx(path: str, log=print, model: onnx.ModelProto | None = None
                    ) -> tuple[DLRM, Arch]:
    """Our eval-mode DLRM equal to the ONNX file's, checked against it (``model``: the file,
    already loaded). ``NotADlrm`` when the graph is not one."""
    model = load_onnx(path) if model is None else model
    arch, state = recognise(model)
    dlrm = DLRM(arch).eval()
    missing = set(dlrm.state_dict()) - set(state)
    if missing:
        raise NotADlrm(f"no weights found for {', '.join(sorted(missing))}")
    dlrm.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
    diff = verify(model, dlrm)
    layout = input_layout(model, arch.num_tables)
    log(f"loaded {path}: {arch.describe()}, {layout} index layout (matches the ONNX graph to "
        f"{diff:.2g})")
    return dlrm, arch
