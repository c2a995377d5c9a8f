"""The DLRM torch module, with facebookresearch/dlrm's ``DLRM_Net`` semantics and state_dict keys.

Keys: ``emb_l.K.weight`` (one EmbeddingBag per table), ``bot_l.{2i}.weight/bias`` and
``top_l.{2i}.weight/bias`` (Sequential of Linear and activation), ``v_W_l.K`` for learned
weighted pooling. The forward is written as the reference writes it (bmm, then the triangle
gather ``Z[:, li, lj]``, then ``cat``), so the compiler sees the same graph for our model and a
reference one; the compiler recognises the pattern, not our module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from . import torch_ops  # noqa: F401  (registers torch.ops.dlrmc)
from .arch import Arch
from .ops import Pooling


def _mlp(widths: tuple[int, ...], last_act: str, rng) -> nn.Sequential:
    """Linear layers with ReLU between them; after the last, ``last_act``: "relu",
    "sigmoid" or "none" (nothing appended, so the state_dict keys stay the reference's)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        n, m = widths[i], widths[i + 1]
        lin = nn.Linear(n, m, bias=True, device=None if rng else "meta")
        if rng is not None:
            # The reference's init: W ~ N(0, sqrt(2/(m+n))), b ~ N(0, sqrt(1/m)).
            w = rng.normal(0.0, np.sqrt(2 / (m + n)), size=(m, n)).astype(np.float32)
            b = rng.normal(0.0, np.sqrt(1 / m), size=m).astype(np.float32)
            lin.weight = nn.Parameter(torch.from_numpy(w))
            lin.bias = nn.Parameter(torch.from_numpy(b))
        layers.append(lin)
        last = i == len(widths) - 2
        act = last_act if last else "relu"
        if act != "none":
            layers.append(nn.Sigmoid() if act == "sigmoid" else nn.ReLU())
    return nn.Sequential(*layers)


def _table(n: int, m: int, rng, mode: str) -> nn.EmbeddingBag:
    if rng is None:
        return nn.EmbeddingBag(n, m, mode=mode, sparse=mode != "max", device="meta")
    # The reference's init, U(-sqrt(1/n), sqrt(1/n)), drawn in float32 in place: the Kaggle
    # tables are 2 GB and a float64 draw would double that. torch's allocator aligns to 64
    # bytes, which lets TVM take the table zero-copy.
    weight = torch.empty((n, m))
    _uniform_rows(rng, weight.numpy(), n)
    return nn.EmbeddingBag(n, m, mode=mode, sparse=mode != "max", _weight=weight)


def _uniform_rows(rng, out: np.ndarray, n: int) -> None:
    """Fill ``out`` with the next draws of ``rng`` scaled to U(-sqrt(1/n), sqrt(1/n))."""
    rng.random(out=out, dtype=np.float32)
    _scale(out, n)


def _scale(out: np.ndarray, n: int) -> None:
    """U(0, 1) draws -> U(-sqrt(1/n), sqrt(1/n)), in place, in float32."""
    a = np.float32(np.sqrt(1.0 / n))
    out *= 2 * a
    out -= a


def _stream_at(seed: int, position: int) -> np.random.Generator:
    """``np.random.default_rng(seed)`` after ``position`` float32 draws (each takes half of
    one 64-bit output; an odd count leaves the other half buffered, as a real draw does)."""
    bits = np.random.default_rng(seed).bit_generator
    bits.advance(position // 2)
    rng = np.random.Generator(bits)
    if position % 2:
        rng.random(1, dtype=np.float32)
    return rng


@dataclass(frozen=True)
class RandomTable:
    """One table of ``DLRM(arch, seed)``'s random init, drawn a slice of rows at a time with
    the same values: ``start`` is the float32 draws the tables before it took."""

    seed: int
    start: int
    rows: int
    dim: int

    shape = property(lambda self: (self.rows, self.dim))
    dtype = np.dtype(np.float32)

    def draw(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi``, float32."""
        out = np.empty((hi - lo, self.dim), np.float32)
        _uniform_rows(_stream_at(self.seed, self.start + lo * self.dim), out, self.rows)
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (ascending, distinct), float32, walking the stream once."""
        out = np.empty((len(rows), self.dim), np.float32)
        rng, at = _stream_at(self.seed, self.start), self.start
        for k, row in enumerate(rows):
            want = self.start + int(row) * self.dim
            if want != at:      # jump ahead; an advance drops a buffered half-output
                rng.bit_generator.advance(want // 2 - (at + 1) // 2)
                if want % 2:
                    rng.random(1, dtype=np.float32)
            rng.random(out=out[k], dtype=np.float32)
            at = want + self.dim
        _scale(out, self.rows)
        return out


class CrossNet(nn.Module):
    """TorchRec's low-rank cross layers (DLRM_DCN), its parameter names: x_{l+1} =
    x0 * (W_l (V_l x_l) + b_l) + x_l, W_l [N, r], V_l [r, N], b_l [N]."""

    def __init__(self, width: int, layers: int, rank: int, rng):
        super().__init__()

        def param(*shape):
            if rng is None:
                return nn.Parameter(torch.empty(shape, device="meta"))
            std = np.sqrt(2 / sum(shape))       # TorchRec's xavier_normal_
            return nn.Parameter(torch.from_numpy(rng.normal(0, std, shape).astype(np.float32)))

        self.W_kernels = nn.ParameterList(param(width, rank) for _ in range(layers))
        self.V_kernels = nn.ParameterList(param(rank, width) for _ in range(layers))
        self.bias = nn.ParameterList(
            nn.Parameter(torch.zeros(width, device=None if rng is not None else "meta"))
            for _ in range(layers))

    def forward(self, x0):
        x = x0
        for w, v, b in zip(self.W_kernels, self.V_kernels, self.bias):
            x = x0 * nn.functional.linear(nn.functional.linear(x, v), w, b) + x
        return x


class DLRM(nn.Module):
    """DLRM with reference semantics. ``forward(dense_x, lS_o, lS_i)`` -> click probability [B, 1].

    ``lS_o`` is [T, B] start offsets; ``lS_i`` a list/tuple of T 1-D index tensors or a [T, N]
    tensor. Weights are initialised as the reference does, from ``seed``; with ``init=False``
    they are left on the meta device for ``load_state_dict(..., assign=True)``. With
    ``lazy_tables`` the tables stay on the meta device and ``table_sources`` (state_dict name
    -> ``RandomTable``) draws their values when asked, so a compile can write tables larger
    than memory; every other weight is the same as without it.
    """

    def __init__(self, arch: Arch, seed: int = 0, init: bool = True, lazy_tables: bool = False):
        super().__init__()
        self.arch = arch
        rng = np.random.default_rng(seed) if init else None
        m = arch.sparse_feature_size
        self.table_sources: dict = {}    # state_dict name -> RandomTable (or StoredRows)
        if lazy_tables and init:
            start = 0
            for k, n in enumerate(arch.embedding_sizes):
                self.table_sources[f"emb_l.{k}.weight"] = RandomTable(seed, start, n, m)
                start += n * m
            rng = _stream_at(seed, start)
        self.emb_l = nn.ModuleList(_table(n, m, None if self.table_sources else rng, arch.pooling)
                                   for n in arch.embedding_sizes)
        if arch.weighted_pooling == "learned":
            self.v_W_l = nn.ParameterList(
                nn.Parameter(torch.ones(n, device=None if init else "meta"))
                for n in arch.embedding_sizes)
        elif arch.weighted_pooling == "fixed":
            for k, n in enumerate(arch.embedding_sizes):
                self.register_buffer(f"_fixed_w{k}", torch.ones(n), persistent=False)
        if arch.interaction_op == "dcn":
            self.cross_l = CrossNet(arch.top_input_width, arch.dcn_layers, arch.dcn_low_rank, rng)
        if arch.interaction_op == "projection":    # TorchRec's DLRM_Projection branches
            self.proj_l1 = _mlp(arch.proj_widths(1), "relu", rng)
            self.proj_l2 = _mlp(arch.proj_widths(2), "relu", rng)
        self.bot_l = _mlp(arch.mlp_bot, "relu", rng)
        self.top_l = _mlp(arch.ln_top, "sigmoid" if arch.output == "probability" else "none", rng)

    @property
    def stored_quant(self) -> str | None:
        """"int8" or "int4" where every table's source already holds its rows so (a quantized
        TorchRec checkpoint's ``StoredRows``), else None."""
        kinds = {getattr(s, "quant", None) for s in self.table_sources.values()}
        return kinds.pop() if len(kinds) == 1 and len(self.table_sources) == len(self.emb_l) \
            else None

    def _pool_weights(self, k: int):
        if self.arch.weighted_pooling == "learned":
            return self.v_W_l[k]
        if self.arch.weighted_pooling == "fixed":
            return getattr(self, f"_fixed_w{k}")
        return None

    def apply_emb(self, lS_o, lS_i):
        ly = []
        for k, emb in enumerate(self.emb_l):
            idx = lS_i[k]
            w = self._pool_weights(k)
            psw = None if w is None else w.gather(0, idx)
            ly.append(emb(idx, lS_o[k], per_sample_weights=psw))
        return ly

    def interact_features(self, x, ly):
        if self.arch.interaction_op == "dot":
            (batch_size, d) = x.shape
            T = torch.cat([x] + ly, dim=1).view((batch_size, -1, d))
            Z = torch.bmm(T, torch.transpose(T, 1, 2))
            _, ni, nj = Z.shape
            offset = 1 if self.arch.interaction_itself else 0
            li = torch.tensor([i for i in range(ni) for j in range(i + offset)])
            lj = torch.tensor([j for i in range(nj) for j in range(i + offset)])
            Zflat = Z[:, li, lj]
            return torch.cat([x] + [Zflat], dim=1)
        if self.arch.interaction_op == "dcn":
            return self.cross_l(torch.cat([x] + ly, dim=1))
        if self.arch.interaction_op == "projection":
            (batch_size, d) = x.shape
            features = torch.cat([x] + ly, dim=1)
            left = self.proj_l1(features).reshape(batch_size, -1, d)
            right = self.proj_l2(features).reshape(batch_size, d, -1)
            return torch.cat([x, torch.bmm(left, right).reshape(batch_size, -1)], dim=1)
        return torch.cat([x] + ly, dim=1)

    def with_rows(self, lS_i) -> tuple["DLRM", list[np.ndarray]]:
        """For a model whose tables are undrawn (``lazy_tables``): the same model with each
        table cut down to the rows ``lS_i[k]`` names, drawn now, and those indices renumbered
        into it. The pair computes what this model would on a batch with these indices,
        holding a few rows instead of the tables."""
        rows = [np.unique(np.asarray(i, np.int64)) for i in lS_i]
        rows = [r if len(r) else np.zeros(1, np.int64) for r in rows]   # a table needs a row
        small = DLRM(replace(self.arch, embedding_sizes=tuple(len(r) for r in rows)), init=False)
        state = {k: v for k, v in self.state_dict().items() if k not in self.table_sources}
        for k, r in enumerate(rows):
            source = self.table_sources[f"emb_l.{k}.weight"]
            state[f"emb_l.{k}.weight"] = torch.from_numpy(source.take(r))
            if f"v_W_l.{k}" in state:
                state[f"v_W_l.{k}"] = state[f"v_W_l.{k}"][torch.from_numpy(r)]
        small.load_state_dict(state, strict=True, assign=True)
        return small.eval(), [np.searchsorted(r, np.asarray(i, np.int64)) for r, i in
                              zip(rows, lS_i)]

    def forward(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        ly = self.apply_emb(lS_o, lS_i)
        z = self.interact_features(x, ly)
        return self.top_l(z)

    def probabilities(self, dense_x, lS_o, lS_i):
        """Click probabilities: ``forward``, through a sigmoid when the model ends in logits."""
        out = self.forward(dense_x, lS_o, lS_i)
        return out if self.arch.output == "probability" else torch.sigmoid(out)

    def forward_flat(self, dense_x, indices, offsets):
        """``forward`` on the flat layout (``dlrmc.frontend.ops``): ``indices`` [N] every
        table's, table-major, ``offsets`` [T*B+1]; all tables pooled by one op."""
        weights = [self._pool_weights(k) for k in range(len(self.emb_l))]
        ly = torch.ops.dlrmc.embedding_bags_flat(
            [e.weight for e in self.emb_l], indices, offsets,
            [] if weights[0] is None else weights, int(Pooling.of(self.arch.pooling)))
        return self.top_l(self.interact_features(self.bot_l(dense_x), list(ly)))


class FlatDLRM(DLRM):
    """A DLRM whose ``forward`` is ``forward_flat``, sharing the modules and weights of
    ``model`` under the same names: what ``torch.export`` captures for an artifact."""

    def __init__(self, model: DLRM):
        nn.Module.__init__(self)
        self.arch = model.arch
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=False)

    forward = DLRM.forward_flat
