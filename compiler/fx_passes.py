"""Graph rewrites on the exported (core ATen) FX graph, before it is handed to TVM.

``batch_embedding_bags`` groups the per-table ``aten._embedding_bag`` nodes that read rows
of one [T, B] offset matrix (the reference's ``lS_o[k]``) into one ``dlrmc::embedding_bags``
node: a single table-batched kernel instead of one launch per table.

``fuse_linear`` turns ``addmm(b, x, permute(W, [1, 0]))`` (or ``mm``), with a ReLU or Sigmoid
that alone consumes it, into one ``dlrmc::linear`` node: our dense kernel with the bias and
activation in its epilogue.

``fuse_dot_interaction`` finds the reference interaction,

    T = view(cat([x, e_1, .., e_n], 1), [B, -1, d]); Z = bmm(T, T^T)
    Zflat = index(Z, [None, li, lj]); R = cat([x, Zflat], 1)

checks that the constants li/lj are the strictly-lower triangle (or with the diagonal) in
row-major order, and replaces it with one ``dlrmc::dot_interaction`` node: ``R`` when the
concat with ``x`` is there, ``Zflat`` alone otherwise. ``Z`` may come from ``T @ T^T`` (bmm
wrapped in same-shape views) and li/lj from ``torch.tril_indices`` in the graph. Any other
``Z[:, li, lj]`` is lowered as written (``lower``'s joint index).
"""

from __future__ import annotations

import torch
from torch import fx

from ..frontend.ops import interaction_pairs
from ..frontend import torch_ops  # noqa: F401  (registers torch.ops.dlrmc)

aten = torch.ops.aten
_PASS_THROUGH = {aten.clone.default, aten.lift_fresh_copy.default, aten.detach_.default,
                 aten.detach.default, aten._to_copy.default, aten.alias.default}


def _replace(old: fx.Node, op, args: tuple) -> None:
    """Put ``op(*args)`` in place of ``old``; ``_tidy`` then drops what only ``old`` used."""
    with old.graph.inserting_before(old):
        new = old.graph.call_function(op, args)
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)


def _tidy(ep: torch.export.ExportedProgram, changed: int) -> int:
    if changed:
        ep.graph_module.graph.eliminate_dead_code()
        ep.graph_module.graph.lint()
        ep.graph_module.recompile()
    return changed


_RESHAPES = (aten.view.default, aten.reshape.default, aten.expand.default)
# Ops that make index tensors from sizes alone, and what picks rows of them.
INDEX_MAKERS = (aten.tril_indices.default, aten.triu_indices.default)
_INDEX_PICKS = (aten.slice.Tensor, aten.select.int, aten.squeeze.dims, aten.squeeze.dim)


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _source(node):
    """Look through copies, full slices and reshapes to the same shape (``matmul``'s
    decomposition wraps ``bmm`` in them), which leave values unchanged."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _PASS_THROUGH:
            node = node.args[0]
        elif node.target == aten.slice.Tensor and _full_slice(node):
            node = node.args[0]
        elif node.target in _RESHAPES and _shape(node) is not None \
                and _shape(node) == _shape(node.args[0]):
            node = node.args[0]
        else:
            break
    return node


def _full_slice(node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2], args[3], args[4] or 1
    return (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= 2**62)) \
        and step == 1


def _constant(ep: torch.export.ExportedProgram, node) -> torch.Tensor | None:
    """The value of a constant tensor node (lifted constants, through copies), else None."""
    node = _source(node)
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return getattr(ep.graph_module, node.target, None)
    if node.op == "call_function" and node.target in INDEX_MAKERS:
        return node.target(*node.args)            # sizes and an offset: ints
    if node.op == "call_function" and node.target in _INDEX_PICKS \
            and not any(isinstance(a, fx.Node) for a in node.args[1:]):
        base = _constant(ep, node.args[0])
        return None if base is None else node.target(base, *node.args[1:])
    if node.op == "placeholder":
        for spec in ep.graph_signature.input_specs:
            if spec.arg.name == node.name and spec.target in ep.constants:
                value = ep.constants[spec.target]
                return value if isinstance(value, torch.Tensor) else None
    return None


def _is_transpose_of(node, src) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target == aten.permute.default:
        return node.args[0] is src and list(node.args[1]) == [0, 2, 1]
    if node.target == aten.transpose.int:
        return node.args[0] is src and sorted(d % 3 for d in node.args[1:3]) == [1, 2]
    return False


def _triangle(li: torch.Tensor, lj: torch.Tensor, n: int) -> bool | None:
    """True/False: li, lj are the triangle with/without the diagonal; None: neither."""
    for itself in (False, True):
        want_i, want_j = interaction_pairs(n, itself)
        if li.tolist() == want_i.tolist() and lj.tolist() == want_j.tolist():
            return itself
    return None


def _concatenated(node, width: int) -> list | None:
    """[x, e_1, ..], when ``node`` is view(cat([x, e_1, ..], 1), [B, -1, d]) of [B, d] parts."""
    if not (isinstance(node, fx.Node) and node.target in (aten.view.default, aten.reshape.default)):
        return None
    cat = node.args[0]
    if not (isinstance(cat, fx.Node) and cat.target == aten.cat.default):
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    parts = list(cat.args[0])
    shapes = [p.meta["val"].shape if isinstance(p, fx.Node) and "val" in p.meta else None
              for p in parts]
    if dim not in (1, -1) or any(s is None or len(s) != 2 or s[1] != width for s in shapes):
        return None
    return parts


def fuse_dot_interaction(ep: torch.export.ExportedProgram) -> int:
    """Rewrite every reference interaction in ``ep`` in place; return how many were found."""
    graph = ep.graph_module.graph
    found = 0
    for index in list(graph.nodes):
        if index.op != "call_function" or index.target != aten.index.Tensor:
            continue
        bmm, idx = _source(index.args[0]), index.args[1]
        if not (isinstance(bmm, fx.Node) and bmm.target == aten.bmm.default and len(idx) == 3
                and idx[0] is None):
            continue
        feats = _source(bmm.args[0])
        if not _is_transpose_of(_source(bmm.args[1]), feats):
            continue
        li, lj = _constant(ep, idx[1]), _constant(ep, idx[2])
        shape = feats.meta.get("val").shape if "val" in feats.meta else None
        if li is None or lj is None or shape is None or not isinstance(shape[1], int):
            continue
        itself = _triangle(li, lj, shape[1])
        if itself is None:
            continue
        target, prepend = index, False
        users = list(index.users)
        parts = _concatenated(feats, shape[2])
        if len(users) == 1 and users[0].target == aten.cat.default and parts is not None:
            cat = users[0]
            dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
            if list(cat.args[0]) == [parts[0], index] and dim in (1, -1):
                target, prepend = cat, True
        # The parts themselves when we can see them: the kernel reads them in place.
        _replace(target, torch.ops.dlrmc.dot_interaction.default, (parts or [feats], itself, prepend))
        found += 1
    return _tidy(ep, found)


_EMBEDDING_BAGS = (aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
_EBAG_ARGS = ("weight", "indices", "offsets", "scale_grad_by_freq", "mode", "sparse",
              "per_sample_weights", "include_last_offset", "padding_idx")
_EBAG_DEFAULTS = (None, None, None, False, 0, False, None, False, -1)


def embedding_bag_args(node: fx.Node) -> dict:
    """The arguments of an aten embedding-bag node by name, defaults filled in."""
    a = dict(zip(_EBAG_ARGS, _EBAG_DEFAULTS))
    a.update(zip(_EBAG_ARGS, node.args))
    a.update(node.kwargs)
    return a


def batch_embedding_bags(ep: torch.export.ExportedProgram) -> int:
    """Group embedding bags over rows of one offset matrix; return the tables batched."""
    import operator

    graph = ep.graph_module.graph
    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _EMBEDDING_BAGS:
            continue
        a = embedding_bag_args(node)
        off = a["offsets"]
        users = list(node.users)
        if not (isinstance(off, fx.Node) and off.target == aten.select.int and off.args[1] == 0
                and isinstance(off.args[2], int) and off.args[2] >= 0):
            continue
        if a["include_last_offset"] or (a["padding_idx"] is not None and a["padding_idx"] >= 0):
            continue
        if not all(u.target == operator.getitem and u.args[1] == 0 for u in users):
            continue
        w, i = a["weight"].meta.get("val"), a["indices"].meta.get("val")
        if w is None or i is None or w.dim() != 2 or w.dtype != torch.float32:
            continue
        key = (off.args[0], int(a["mode"]), int(w.shape[1]), i.dtype,
               a["per_sample_weights"] is not None)
        groups.setdefault(key, []).append((node, a, off.args[2]))
    order = {n: k for k, n in enumerate(graph.nodes)}
    batched = 0
    for (offsets, mode, _, _, weighted), members in groups.items():
        last = members[-1][0]
        first_use = min(order[u] for node, _, _ in members for g in node.users for u in g.users)
        if len(members) < 2 or first_use < order[last]:
            continue
        with graph.inserting_after(last):
            tbe = graph.call_function(torch.ops.dlrmc.embedding_bags.default, (
                [a["weight"] for _, a, _ in members], [a["indices"] for _, a, _ in members],
                offsets, [a["per_sample_weights"] for _, a, _ in members] if weighted else [],
                mode, [row for _, _, row in members]))
        tbe.meta["val"] = [u.meta.get("val") for node, _, _ in members
                           for u in list(node.users)[:1]]
        anchor = tbe
        for j, (node, _, _) in enumerate(members):
            with graph.inserting_after(anchor):
                part = graph.call_function(operator.getitem, (tbe, j))
            anchor = part
            for u in list(node.users):
                part.meta = dict(u.meta)
                u.replace_all_uses_with(part)
        batched += len(members)
    return _tidy(ep, batched)


_ACTIVATIONS = {aten.relu.default: "relu", aten.sigmoid.default: "sigmoid"}


def fuse_linear(ep: torch.export.ExportedProgram) -> int:
    """Rewrite every 2-D Linear (+ReLU/Sigmoid) in ``ep`` in place; return how many."""
    graph = ep.graph_module.graph
    found = 0
    for mm in list(graph.nodes):
        if mm.op != "call_function" or mm.target not in (aten.addmm.default, aten.mm.default):
            continue
        if mm.target == aten.addmm.default:
            if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, wt = mm.args[:3]
            if not (isinstance(bias, fx.Node) and "val" in bias.meta and bias.meta["val"].dim() == 1):
                continue
        else:
            bias, (x, wt) = None, mm.args[:2]
        if not (isinstance(wt, fx.Node) and wt.target == aten.permute.default
                and list(wt.args[1]) == [1, 0]):
            continue
        if x.meta.get("val") is None or x.meta["val"].dim() != 2:
            continue
        users = list(mm.users)
        target, act = mm, "none"
        if len(users) == 1 and users[0].target in _ACTIVATIONS:
            target, act = users[0], _ACTIVATIONS[users[0].target]
        _replace(target, torch.ops.dlrmc.linear.default, (x, wt.args[0], bias, act))
        found += 1
    return _tidy(ep, found)


def _other(node: fx.Node, one) -> object | None:
    """The operand of a binary ``node`` that is not ``one`` (None unless exactly one is)."""
    a, b = node.args[:2]
    return b if a is one and b is not one else a if b is one and a is not one else None


def fuse_cross(ep: torch.export.ExportedProgram) -> int:
    """Rewrite each DCN cross layer's ``x0 * linear(h, W, b) + xl`` (after ``fuse_linear``,
    either operand order) into one ``dlrmc::cross_linear``; return how many."""
    graph = ep.graph_module.graph
    found = 0
    for lin in list(graph.nodes):
        if lin.target != torch.ops.dlrmc.linear.default or lin.args[3] != "none":
            continue
        (mul,) = lin.users if len(lin.users) == 1 else (None,)
        if mul is None or mul.target != aten.mul.Tensor or len(mul.users) != 1:
            continue
        (add,) = mul.users
        x0 = _other(mul, lin)
        xl = _other(add, mul) if add.target == aten.add.Tensor and not add.kwargs else None
        if not (isinstance(x0, fx.Node) and isinstance(xl, fx.Node)):
            continue
        shapes = [n.meta.get("val") for n in (lin, x0, xl)]
        if any(v is None or v.dtype != torch.float32 for v in shapes) or not (
                shapes[0].shape == shapes[1].shape == shapes[2].shape):
            continue
        x, w, b, _ = lin.args
        _replace(add, torch.ops.dlrmc.cross_linear.default, (x, w, b, x0, xl))
        found += 1
    return _tidy(ep, found)
