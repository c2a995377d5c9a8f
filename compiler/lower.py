"""ExportedProgram -> TVM Relax, with our lowering for what TVM lacks or gets wrong.

TVM's ExportedProgram importer handles everything except:

- ``aten._embedding_bag`` / ``aten._embedding_bag_forward_only`` (TVM has no converter): the
  tables that read rows of one offset matrix become one table-batched ``call_tir``
  (``fx_passes.batch_embedding_bags``); any other becomes a ``call_tir`` of the one-table
  kernel with the node's mode, offsets convention, per_sample_weights and padding_idx;
- ``aten.select.int``, which TVM lowers to an unchecked ``take`` that mishandles negative
  indices; ``aten.index.Tensor`` of the form ``x[:, a, b]``, which TVM takes as an outer
  product; ``tril_indices`` / ``triu_indices``, which it lacks (constants here);
- the dot interaction, which ``fx_passes.fuse_dot_interaction`` first rewrites into one
  ``dlrmc::dot_interaction`` node, lowered here to our interaction kernel; on the CPU, when
  a table-batched call's tables all go (in order) to it and nowhere else, the embedding
  kernel writes them as one [T, B, D] tensor that the interaction reads in place (one
  allocation and two arguments instead of T of each: about 80 fewer VM instructions a call);
- ``aten.cat`` of 2-D tensors along the last axis (the ``cat`` interaction), lowered to our
  row-concat kernel instead of TVM's element-wise one;
- Linear layers, which ``fx_passes.fuse_linear`` rewrites into ``dlrmc::linear`` nodes,
  lowered to weight packing (lifted to load time by ``build``) and our dense kernel, blocked
  with the target's knobs; in bf16/fp16 (``precision``) or int8 (``mlp_quant``, with the
  calibrated input ranges of ``numerics.linear_input_ranges``) the packing rounds or
  quantises the weights and the kernel is ``schedules.dense_lowp``'s.

Parameters stay inputs of ``main`` (after the user inputs) so the weights never enter the
compiled code; ``lower`` returns them, in order, beside the module.
"""

from __future__ import annotations

import operator
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from ..frontend.ops import Pooling
from ..schedules.dense import narrow, pack_kernel
from ..schedules.dense_lowp import pack_lowp_kernel, quantize_pack_kernel, words
from ..schedules.embedding_bag import PREFETCH, QUANTS, fused_rows, fused_width, quantize_rows
from ..schedules.interaction import output_width
from ..schedules.kernels import make
from ..targets import backend_for
from ..targets.knobs import CpuKnobs, cpu_knobs
from ..frontend import torch_ops  # noqa: F401  (registers torch.ops.dlrmc)
from .fx_passes import (INDEX_MAKERS, batch_embedding_bags, embedding_bag_args, fuse_cross,
                        fuse_dot_interaction, fuse_linear)
from .numerics import MLP_QUANTS, PRECISIONS, activation_qparams, linear_input_ranges


class LoweringError(ValueError):
    """A graph that dlrmc cannot lower, with the node that stopped it."""


def _static_dims(var: relax.Expr, what: str, node) -> list:
    shape = var.ty.shape
    if shape is None:
        raise LoweringError(f"{node.name}: {what} has an unknown shape")
    return list(shape)


def _as_dtype(bb, expr: relax.Expr, dtype: str) -> relax.Expr:
    return expr if expr.ty.dtype == dtype else bb.emit(relax.op.astype(expr, dtype))


def _table(weight: relax.Expr, node) -> int:
    wshape = _static_dims(weight, "the embedding table", node)
    if len(wshape) != 2 or not isinstance(wshape[1], tvm.tirx.IntImm):
        raise LoweringError(f"{node.name}: the embedding table must be 2-D with a static width")
    if weight.ty.dtype != "float32":
        raise LoweringError(f"{node.name}: embedding tables must be float32, got {weight.ty.dtype}")
    return int(wshape[1])


def _quantized(weights: list, quant: str | None, tables: set) -> None:
    if quant is not None:
        for w in weights:
            if not isinstance(w, relax.Var):
                raise LoweringError("only embedding tables that are model parameters can be "
                                    "quantised")
            tables.add(w.name)


def _convert_embedding_bag(node, importer, quant=None, tables=None, gpu=False) -> relax.Expr:
    a = embedding_bag_args(node)
    env, bb = importer.env, importer.block_builder
    weight, indices, offsets = env[a["weight"]], env[a["indices"]], env[a["offsets"]]
    dim = _table(weight, node)
    mode = Pooling.of(a["mode"]).label
    index_dtype = str(indices.ty.dtype)
    offsets = _as_dtype(bb, offsets, index_dtype)
    last = bool(a["include_last_offset"])
    pad = a["padding_idx"]
    pad = None if pad is None or pad < 0 else int(pad)
    args = [weight, indices, offsets]
    if a["per_sample_weights"] is not None:
        args.append(env[a["per_sample_weights"]])
    _quantized([weight], quant, tables)
    kernel = _bags_kernel(gpu, quant, dim=dim, mode=mode, weighted=len(args) == 4,
                          index_dtype=index_dtype, include_last_offset=last, padding_idx=pad,
                          offset_rows=None, batch=None)
    gv = bb.add_func(kernel, f"embedding_bag_{mode}_{dim}")
    batch = _static_dims(offsets, "offsets", node)[0] - (1 if last else 0)
    out = bb.emit(relax.call_tir(gv, args, relax.TensorType((batch, dim), "float32")))
    # Callers read only item 0 (the pooled rows) of aten's 4-tuple.
    return bb.emit(relax.Tuple([out]))


def _bags_kernel(gpu: bool, quant, **args):
    """The CPU kernel (reading ``quant`` tables) or the GPU one (its backend refuses them)."""
    return make("embedding_bags_gpu", **args) if gpu else make("embedding_bags", **args,
                                                                quant=quant, prefetch=PREFETCH)


def _flat_batch(count, tables: int, node):
    """B, from the length of flat offsets, T*B + 1 (a number, or T * batch + 1 with the
    batch a variable)."""
    if isinstance(count, tvm.tirx.IntImm):
        return (int(count) - 1) // tables
    names = tvm.tirx.analysis.undefined_vars(count)
    if len(names) == 1:
        batch = names[0]
        one, times = tvm.tirx.IntImm("int64", 1), tvm.tirx.IntImm("int64", tables)
        if any(tvm_ffi.structural_equal(count, form) for form in (
                one + times * batch, times * batch + one, one + batch * times)):
            return batch
    raise LoweringError(f"{node.name}: flat offsets must have T*B + 1 = {tables}*batch + 1 "
                        f"entries, got {count}")


def _tables_feed_interaction(node, tables: int) -> bool:
    """Whether the ``tables`` outputs of the table-batched ``node`` go to one dot interaction
    as its features 1..T, in order, and nowhere else."""
    gets = list(node.users)
    if not all(g.target is operator.getitem and len(g.users) == 1 for g in gets):
        return False
    users = {u for g in gets for u in g.users}
    if len(users) != 1:
        return False
    (user,) = users
    feats = list(user.args[0])
    return (user.target is torch.ops.dlrmc.dot_interaction.default
            and len(feats) == tables + 1 and feats[0] not in gets
            and all(f in gets and f.args[1] == k for k, f in enumerate(feats[1:])))


def _table_batched(node, importer, weights, index_inputs, offsets, weighting, mode, batch_of,
                   quant, tables, gpu, **layout) -> relax.Expr | list:
    """One call of the table-batched kernel over ``weights`` (its ``layout`` arguments:
    ``offset_rows`` or ``flat_tables``); ``weighting``: the per-index or per-row weights, if
    any; ``batch_of(offsets shape)``: the batch. On the CPU, for an interaction that reads
    the tables in place (``_tables_feed_interaction``), the kernel writes one [T, B, D]
    tensor, kept in ``importer.stacked_bags``; the node's value is then the list of its
    tables (unemitted ``take``s, which that interaction does not use)."""
    env, bb = importer.env, importer.block_builder
    ws, ids = [env[w] for w in weights], [env[i] for i in index_inputs]
    dims = {_table(w, node) for w in ws}
    if len(dims) != 1:
        raise LoweringError(f"{node.name}: the tables must share one width, got {sorted(dims)}")
    index_dtype = str(ids[0].ty.dtype)
    off = _as_dtype(bb, env[offsets], index_dtype)
    _quantized(ws, quant, tables)
    dim = dims.pop()
    one = not gpu and _tables_feed_interaction(node, len(ws))
    if one:
        layout["one_output"] = True
    kernel = _bags_kernel(gpu, quant, dim=dim, mode=Pooling.of(mode).label,
                          weighted=bool(weighting), index_dtype=index_dtype,
                          include_last_offset=False, padding_idx=None, batch=None, **layout)
    gv = bb.add_func(kernel, f"embedding_bags_{len(ws)}")
    batch = batch_of(_static_dims(off, "offsets", node))
    out_ty = ([relax.TensorType((len(ws), batch, dim), "float32")] if one
              else [relax.TensorType((batch, w.ty.shape[1]), "float32") for w in ws])
    out = bb.emit(relax.call_tir(gv, ws + ids + [off] + [env[v] for v in weighting], out_ty))
    if not one:
        return out
    importer.stacked_bags[node] = out
    return [relax.op.take(out, relax.const(k, "int64"), axis=0) for k in range(len(ws))]


def _convert_embedding_bags_flat(node, importer, quant=None, tables=None, gpu=False
                                 ) -> relax.Expr:
    """``dlrmc::embedding_bags_flat``: the table-batched kernel on the flat layout."""
    weights, indices, offsets, row_weights, mode = node.args
    return _table_batched(node, importer, weights, [indices], offsets, row_weights, mode,
                          lambda shape: _flat_batch(shape[0], len(weights), node), quant,
                          tables, gpu, offset_rows=None, flat_tables=len(weights))


def _convert_embedding_bags(node, importer, quant=None, tables=None, gpu=False) -> relax.Expr:
    """``dlrmc::embedding_bags``: the table-batched kernel on rows of a [T, B] offset matrix."""
    weights, indices, offsets, psw, mode, rows = node.args
    return _table_batched(node, importer, weights, indices, offsets, psw, mode,
                          lambda shape: shape[1], quant, tables, gpu, offset_rows=list(rows))


@dataclass(frozen=True)
class Numerics:
    """How the dense layers and the interaction compute (``dlrmc.compiler.numerics``)."""

    precision: str = "fp32"
    mlp_quant: str | None = None
    ranges: dict | None = None     # dlrmc::linear node name -> calibrated input (min, max)


def _interaction_inputs(node, importer):
    """(inputs, batch, F, D, stacked) of a ``dlrmc::dot_interaction`` node: F tensors [B, D]
    or one [B, F, D]; F and D must be static."""
    inputs = [importer.env[f] for f in node.args[0]]
    shapes = [_static_dims(t, "an interaction input", node) for t in inputs]
    stacked = len(shapes[0]) == 3
    num, dim = (shapes[0][1], shapes[0][2]) if stacked else (len(inputs), shapes[0][1])
    if not (isinstance(dim, tvm.tirx.IntImm) and (not stacked or isinstance(num, tvm.tirx.IntImm))):
        raise LoweringError(f"{node.name}: the interaction needs static feature count and width")
    return inputs, shapes[0][0], int(num), int(dim), stacked


def _convert_dot_interaction_gpu(node, importer, numerics: Numerics) -> relax.Expr:
    """CUDA: the features stacked as [B, F, D] (one concat), then our interaction kernel."""
    _, itself, prepend = node.args
    bb = importer.block_builder
    inputs, batch, num, dim, stacked = _interaction_inputs(node, importer)
    if not stacked:
        flat = bb.emit(relax.op.concat(inputs, axis=1))
        inputs = [bb.emit(relax.op.reshape(flat, (batch, num, dim)))]
    kernel = make("dot_interaction_gpu", num_features=num, dim=dim, self_interaction=bool(itself),
                  prepend_dense=bool(prepend), batch=None, precision=numerics.precision)
    gv = bb.add_func(kernel, "dot_interaction_gpu")
    width = output_width(num, dim, bool(itself), bool(prepend))
    return bb.emit(relax.call_tir(gv, inputs, relax.TensorType((batch, width), "float32")))


def _convert_linear_gpu(node, importer) -> relax.Expr:
    """CUDA: matmul + bias + activation as Relax ops, which dlight's GPU rules schedule; the
    weight transpose is lifted to load time with the other weight transforms."""
    x_node, w_node, b_node, act = node.args
    env, bb = importer.env, importer.block_builder
    y = bb.emit(relax.op.matmul(env[x_node], relax.op.permute_dims(env[w_node], [1, 0])))
    if b_node is not None:
        y = bb.emit(relax.op.add(y, env[b_node]))
    if act == "relu":
        y = bb.emit(relax.op.nn.relu(y))
    elif act == "sigmoid":
        y = bb.emit(relax.op.sigmoid(y))
    return y


def _convert_dot_interaction(node, importer, knobs: CpuKnobs, numerics: Numerics) -> relax.Expr:
    feats, itself, prepend = node.args
    bb = importer.block_builder
    bags = importer.stacked_bags.get(feats[1].args[0]) if len(feats) > 1 and \
        feats[1].target is operator.getitem else None
    if bags is None:
        inputs, batch, num, dim, stacked = _interaction_inputs(node, importer)
        extra = {"stacked": stacked}
    else:       # the dense features and the embedding kernel's one [T, B, D] output
        x = importer.env[feats[0]]
        batch, dim = _static_dims(x, "an interaction input", node)
        inputs, num, dim, extra = [x, bags], len(feats), int(dim), {"tables": True}
    kernel = make("dot_interaction", num_features=num, dim=dim, self_interaction=bool(itself),
                  prepend_dense=bool(prepend), lanes=knobs.lanes, batch=None,
                  precision=numerics.precision, **extra)
    gv = bb.add_func(kernel, "dot_interaction")
    width = output_width(num, dim, bool(itself), bool(prepend))
    return bb.emit(relax.call_tir(gv, inputs, relax.TensorType((batch, width), "float32")))


def _convert_cat(node, importer, stock) -> relax.Expr:
    """Our row-concat kernel for 2-D float32 tensors joined on the last axis; TVM's otherwise."""
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    inputs = [importer.env[p] for p in parts]
    shapes = [list(t.ty.shape) if t.ty.shape is not None else None for t in inputs]
    if (len(inputs) < 2 or any(sh is None or len(sh) != 2 for sh in shapes) or dim not in (1, -1)
            or any(t.ty.dtype != "float32" for t in inputs)
            or any(not isinstance(sh[1], tvm.tirx.IntImm) for sh in shapes)):
        return stock(node)
    widths = tuple(int(sh[1]) for sh in shapes)
    bb = importer.block_builder
    gv = bb.add_func(make("concat_rows", widths=list(widths), batch=None), "concat_rows")
    out_ty = relax.TensorType((shapes[0][0], sum(widths)), "float32")
    return bb.emit(relax.call_tir(gv, inputs, out_ty))


def _convert_select(node, importer) -> relax.Expr:
    # TVM lowers select to take(mode="fast"): no negative indices, and a warning per use.
    x, dim, index = importer.env[node.args[0]], int(node.args[1]), int(node.args[2])
    shape = _static_dims(x, "the select input", node)
    dim %= len(shape)
    if index < 0:
        if not isinstance(shape[dim], tvm.tirx.IntImm):
            raise LoweringError(f"{node.name}: negative select index on a dynamic dimension")
        index += int(shape[dim])
    bb = importer.block_builder
    part = bb.emit(relax.op.strided_slice(x, [dim], [index], [index + 1]))
    return bb.emit(relax.op.squeeze(part, [dim]))


def _pack_weights(bb, w, bias, n: int, k: int, nr: int, numerics: Numerics, node):
    """The packed weights (and the int8 epilogue terms, else the bias) and the kernel's
    extra recipe arguments."""
    nb = -(-n // nr)
    if numerics.mlp_quant == "int8":
        lo, hi = numerics.ranges[node.name]
        x_scale, x_zero = activation_qparams(lo, hi)
        gv = bb.add_func(quantize_pack_kernel(n, k, nr, x_scale, x_zero), f"quantize_{n}x{k}")
        out = bb.emit(relax.call_tir(gv, [w, bias], [
            relax.TensorType((nb, words(k, "int8"), nr), "int32"),
            relax.TensorType((2, n), "float32")]))
        return bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1)), {
            "kind": "int8", "x_scale": x_scale, "x_zero": x_zero}
    kind = numerics.precision
    if kind == "fp32":
        gv = bb.add_func(pack_kernel(n, k, nr), f"pack_{n}x{k}")
        return bb.emit(relax.call_tir(gv, [w], relax.TensorType((nb, k, nr), "float32"))), bias, {}
    gv = bb.add_func(pack_lowp_kernel(n, k, nr, kind), f"pack_{kind}_{n}x{k}")
    dtype = "float16" if kind == "fp16" else "int32"
    packed = bb.emit(relax.call_tir(gv, [w], relax.TensorType((nb, words(k, kind), nr), dtype)))
    return packed, bias, {"kind": kind}


def _convert_linear(node, importer, knobs: CpuKnobs, numerics: Numerics) -> relax.Expr:
    """``dlrmc::linear``, and ``dlrmc::cross_linear`` (``fuse_cross``) as the dense kernel
    with the cross layer in its epilogue."""
    x_node, w_node, b_node = node.args[:3]
    cross = node.target == torch.ops.dlrmc.cross_linear.default
    act = "cross" if cross else node.args[3]
    env, bb = importer.env, importer.block_builder
    x, w = env[x_node], env[w_node]
    n, k = _static_dims(w, "the Linear weight", node)
    batch, k_in = _static_dims(x, "the Linear input", node)
    if x.ty.dtype != "float32" or w.ty.dtype != "float32":
        raise LoweringError(f"{node.name}: Linear layers must be float32")
    n, k = int(n), int(k)
    nr = knobs.nr if n > knobs.lanes else knobs.lanes
    bias = env[b_node] if b_node is not None else relax.const(np.zeros(n, np.float32))
    if not cross and narrow(n, knobs.lanes) and numerics.precision == "fp32" \
            and numerics.mlp_quant is None:       # W as it is, dot products over K
        kernel = make("dense_narrow", n=n, k=k, act=act, lanes=knobs.lanes,
                      parallel_min_macs=knobs.parallel_min_macs, batch=None)
        gv = bb.add_func(kernel, f"dense_{n}x{k}_{act}")
        return bb.emit(relax.call_tir(gv, [x, w, bias], relax.TensorType((batch, n), "float32")))
    packed, bias, lowp = _pack_weights(bb, w, bias, n, k, nr, numerics, node)
    args = dict(n=n, k=k, act=act, mr=knobs.mr, nr=nr, parallel_min_macs=knobs.parallel_min_macs,
                parallel_min_bytes=knobs.parallel_min_bytes, batch=None)
    if lowp:
        kernel = make("dense_lowp", **args, **lowp, dot=knobs.has_dot(lowp["kind"], nr))
        name = f"dense_{lowp['kind']}_{n}x{k}_{act}"
    else:
        kernel, name = make("dense", **args), f"dense_{n}x{k}_{act}"
    gv = bb.add_func(kernel, name)
    residual = [env[a] for a in node.args[3:5]] if cross else []
    return bb.emit(relax.call_tir(gv, [x, packed, bias, *residual],
                                  relax.TensorType((batch, n), "float32")))


def _convert_index_maker(node, importer) -> relax.Expr:
    """``tril_indices`` / ``triu_indices`` (sizes only): their value, as a constant."""
    return relax.const(node.target(*node.args).numpy())


def _convert_index(node, importer, stock) -> relax.Expr:
    """``x[:, a, b]`` (leading full axes, then several 1-D index tensors taken jointly, as
    ``z[:, rows, cols]`` picks pairs): TVM takes them one after the other, an outer product
    ([B, P, P], not [B, P]). Here the indexed axes are flattened and read with one take."""
    x, indices = importer.env[node.args[0]], list(node.args[1])
    lead = next((i for i, t in enumerate(indices) if t is not None), len(indices))
    picks = [importer.env[t] for t in indices[lead:] if t is not None]
    shape = list(x.ty.shape) if x.ty.shape is not None else []
    dims = shape[lead:lead + len(picks)]
    if (lead == 0 or len(picks) < 2 or len(picks) != len(indices) - lead
            or any(p.ty.ndim != 1 for p in picks) or len(dims) != len(picks)
            or any(not isinstance(d, tvm.tirx.IntImm) for d in dims)):
        return stock(node)
    bb = importer.block_builder
    flat = None
    for pick, n in zip(picks, (int(d) for d in dims)):
        pick = _as_dtype(bb, pick, "int64")
        n64 = relax.const(n, "int64")
        pick = bb.emit(relax.op.where(relax.op.less(pick, relax.const(0, "int64")),
                                      relax.op.add(pick, n64), pick))     # torch's -1 = last
        flat = pick if flat is None else bb.emit(relax.op.add(relax.op.multiply(flat, n64), pick))
    size = int(np.prod([int(d) for d in dims]))
    merged = bb.emit(relax.op.reshape(x, shape[:lead] + [size] + shape[lead + len(picks):]))
    return bb.emit(relax.op.take(merged, flat, axis=lead, mode="clip"))


def common_converters(stock: dict) -> dict:
    """Ours on every backend: what TVM lowers wrongly or not at all, whatever the device."""
    return {"select.int": _convert_select,
            "index.Tensor": lambda node, imp: _convert_index(node, imp, stock["index.Tensor"]),
            **{op.__name__: _convert_index_maker for op in INDEX_MAKERS}}


def gpu_converters(stock: dict, numerics: Numerics = Numerics()) -> dict:
    """The ops we lower ourselves for CUDA targets: our GPU embedding-bag and interaction
    kernels; dense layers as Relax ops for dlight; the rest TVM's. (What it cannot do, the
    CUDA backend refuses first.)"""

    def bag(node, imp):
        return _convert_embedding_bag(node, imp, gpu=True)

    return {
        **common_converters(stock),
        "_embedding_bag.default": bag,
        "_embedding_bag_forward_only.default": bag,
        "embedding_bags.default": lambda node, imp: _convert_embedding_bags(node, imp, gpu=True),
        "embedding_bags_flat.default": lambda node, imp: _convert_embedding_bags_flat(
            node, imp, gpu=True),
        "dot_interaction.default": lambda node, imp: _convert_dot_interaction_gpu(node, imp,
                                                                                  numerics),
        "linear.default": _convert_linear_gpu,
    }


def converters(knobs: CpuKnobs, stock: dict, emb_quant: str | None = None,
               quantized: set | None = None, numerics: Numerics = Numerics()) -> dict:
    """The ATen and dlrmc ops we lower ourselves, for one target's knobs (``stock``: TVM's).
    With ``emb_quant`` the embedding kernels read quantised tables; the names of the table
    parameters they read are added to ``quantized``."""
    def bag(node, imp):
        return _convert_embedding_bag(node, imp, emb_quant, quantized)

    return {
        **common_converters(stock),
        "cat.default": lambda node, imp: _convert_cat(node, imp, stock["cat.default"]),
        "_embedding_bag.default": bag,
        "_embedding_bag_forward_only.default": bag,
        "embedding_bags.default": lambda node, imp: _convert_embedding_bags(
            node, imp, emb_quant, quantized),
        "embedding_bags_flat.default": lambda node, imp: _convert_embedding_bags_flat(
            node, imp, emb_quant, quantized),
        "dot_interaction.default": lambda node, imp: _convert_dot_interaction(node, imp, knobs,
                                                                              numerics),
        "linear.default": lambda node, imp: _convert_linear(node, imp, knobs, numerics),
        "cross_linear.default": lambda node, imp: _convert_linear(node, imp, knobs, numerics),
    }


# The converter families, by the name a backend gives as its ``lowering``
# (``dlrmc.targets.backend``): (target, stock, emb_quant, quantized, numerics) -> convert map.
CONVERTERS = {
    "cpu": lambda target, stock, emb_quant, quantized, numerics: converters(
        cpu_knobs(target), stock, emb_quant, quantized, numerics),
    "gpu": lambda target, stock, emb_quant, quantized, numerics: gpu_converters(stock, numerics),
}


STREAM_BYTES = 1 << 25   # float32 bytes of a table drawn (and quantised) at a time


@dataclass(frozen=True)
class StreamedTable:
    """A table that is drawn as it is written (an ``artifact.format.StreamedArray``):
    ``source``'s rows (``frontend.model.RandomTable``, or ``frontend.checkpoint.StoredRows``:
    a quantised checkpoint's, whose codes are kept as they are when ``quant`` is theirs),
    row-wise quantised with ``quant`` (None: float32), in pieces of ``STREAM_BYTES`` drawn on
    every core, in order, a few pieces ahead of the writer."""

    source: object
    quant: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, dim = self.source.shape
        return (rows, dim) if self.quant is None else (rows, fused_width(dim, self.quant))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.quant is None else np.uint8)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def _piece(self, lo: int, hi: int) -> np.ndarray:
        if self.quant is not None and getattr(self.source, "quant", None) == self.quant:
            return fused_rows(*self.source.codes(lo, hi))   # stored so: its codes as they are
        rows = self.source.draw(lo, hi)
        return rows if self.quant is None else quantize_rows(rows, self.quant)

    def chunks(self):
        rows, dim = self.source.shape
        step = max(1, STREAM_BYTES // (4 * dim))
        starts = iter(range(0, rows, step))
        workers = len(os.sched_getaffinity(0))
        with ThreadPoolExecutor(workers) as pool:
            ahead: deque = deque()
            for lo in starts:
                ahead.append(pool.submit(self._piece, lo, min(lo + step, rows)))
                if len(ahead) > 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()


class _Importer(ExportedProgramImporter):
    """TVM's importer, which takes a weight on the meta device (no data yet: a
    ``StreamedTable`` stands in for it later) as an empty array instead of failing, and
    keeps the table-batched calls lowered to one [T, B, D] output (``_table_batched``)."""

    def __init__(self):
        super().__init__()
        self.stacked_bags: dict = {}     # FX node -> its call's [T, B, D] output

    @staticmethod
    def _convert_pytorch_tensor_to_tvm(tensor_value: torch.Tensor):
        if tensor_value.device.type == "meta":
            return tvm.runtime.empty((0,), "float32")
        return ExportedProgramImporter._convert_pytorch_tensor_to_tvm(tensor_value)


@dataclass
class Lowered:
    """The Relax module and the weights its ``main`` takes after the user inputs."""

    mod: tvm.IRModule
    param_names: list[str]       # state_dict names, in main's order
    params: list                 # zero-copy views of the torch weights, or StreamedTables
    num_inputs: int


def lower(ep: torch.export.ExportedProgram, target: tvm.target.Target,
          unwrap_single_output: bool = True, emb_quant: str | None = None,
          precision: str = "fp32", mlp_quant: str | None = None, calibration=None,
          sources: dict | None = None) -> Lowered:
    """Decompose, rewrite our patterns, import into Relax and detach the parameters.

    ``main`` returns its one output bare when ``unwrap_single_output``, else always a tuple.
    ``emb_quant="int8"``: the embedding tables become row-wise quantised parameters
    (``schedules.embedding_bag.quantize_rows``), read by the embedding kernels as such.
    ``precision``: what the dense layers and interaction multiply in; ``mlp_quant="int8"``:
    int8 dense layers, calibrated on ``calibration`` (batches of exported inputs).
    ``sources``: the values of weights that are meta tensors in the program (state_dict name
    -> a ``RandomTable``, ``DLRM(lazy_tables=True)``): they are returned as
    ``StreamedTable``s, drawn (and quantised) only as the artifact is written.
    """
    if emb_quant is not None and emb_quant not in QUANTS:
        raise LoweringError(f"--emb-quant must be one of {', '.join(QUANTS)}, got {emb_quant!r}")
    if precision not in PRECISIONS:
        raise LoweringError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                            f"{precision!r}")
    if mlp_quant is not None and mlp_quant not in MLP_QUANTS:
        raise LoweringError(f"--mlp-quant must be one of {', '.join(MLP_QUANTS)}, got "
                            f"{mlp_quant!r}")
    ep = ep.run_decompositions()
    lazy = {name for name, t in ep.state_dict.items() if t.device.type == "meta"}
    valueless = lazy - set(sources or {})
    if valueless:
        raise LoweringError(f"weights with no values (meta tensors): "
                            f"{', '.join(sorted(valueless))}")
    if lazy and mlp_quant:
        raise LoweringError("--mlp-quant calibrates on the model's outputs: it needs the tables "
                            "in memory, not drawn as they are written")
    batch_embedding_bags(ep)
    fuse_dot_interaction(ep)
    fuse_linear(ep)
    if backend_for(target).lowering == "cpu":
        fuse_cross(ep)      # the cross layer in the CPU dense kernel's epilogue
    ranges = linear_input_ranges(ep, calibration or []) if mlp_quant else None
    numerics = Numerics(precision, mlp_quant, ranges)
    importer = _Importer()
    stock = importer.create_convert_map()
    quantized: set[str] = set()
    backend = backend_for(target)
    backend.check_options(emb_quant=emb_quant, precision=precision != "fp32", mlp_quant=mlp_quant)
    convert_map = CONVERTERS[backend.lowering](target, stock, emb_quant, quantized, numerics)
    unsupported = sorted({n.target.__name__ for n in ep.graph.nodes if n.op == "call_function"
                          and n.target.__name__ not in convert_map
                          and n.target.__name__ not in stock})
    if unsupported:
        raise LoweringError(f"operators with no Relax lowering: {', '.join(unsupported)}")
    mod = importer.from_exported_program(ep, True, unwrap_single_output, False, convert_map)
    mod, detached = relax.frontend.detach_params(mod)
    main = mod["main"]
    num_inputs = int(main.attrs["num_input"])
    by_arg = {s.arg.name: s.target for s in ep.graph_signature.input_specs
              if s.kind == torch.export.graph_signature.InputKind.PARAMETER}
    names = [by_arg[p.name] for p in main.params[num_inputs:]]
    params = [StreamedTable(sources[n]) if n in lazy else np.from_dlpack(t)
              for n, t in zip(names, detached.get("main", []))]
    if len(names) != len(detached.get("main", [])):
        raise LoweringError("parameter count of the Relax module does not match the program")
    if quantized:
        mod, params = _quantize_tables(mod, params, num_inputs, quantized, emb_quant)
    return Lowered(mod, names, params, num_inputs)


@mutator
class _Retype(PyExprMutator):
    """Replace ``main``'s parameter variables by name."""

    def __init__(self, mod: tvm.IRModule, new_vars: dict):
        super().__init__(mod)
        self.new_vars = new_vars

    def visit_var_(self, var):
        return self.new_vars.get(var.name, var)


def _quantize_tables(mod: tvm.IRModule, params: list, num_inputs: int, tables: set, quant: str):
    """``main`` with the named table parameters as fused uint8 rows, and their values."""
    main = mod["main"]
    new_vars, new_params, values = {}, [], list(params)
    for k, p in enumerate(main.params):
        if p.name in tables:
            v = relax.Var(p.name, relax.TensorType(
                (p.ty.shape[0], fused_width(int(p.ty.shape[1]), quant)), "uint8"))
            new_vars[p.name] = v
            value = params[k - num_inputs]
            values[k - num_inputs] = (StreamedTable(value.source, quant)
                                      if isinstance(value, StreamedTable)
                                      else quantize_rows(value, quant))
            p = v
        new_params.append(p)
    body = _Retype(mod, new_vars).visit_expr(main.body)
    mod["main"] = relax.Function(new_params, body, main.ret_ty, main.is_pure, main.attrs)
    return mod, values
