"""Our ops as torch custom ops, so a rewritten FX graph stays a runnable, typed torch graph.

- ``dlrmc::dot_interaction(features[], self_interaction, prepend_dense)``: contract in
  ``dlrmc.schedules.interaction``;
- ``dlrmc::linear(x, weight, bias, activation)``: act(x @ weight^T + bias), contract in
  ``dlrmc.schedules.dense``;
- ``dlrmc::embedding_bags(weights[], indices[], offsets, per_sample_weights[], mode,
  offset_rows[])``: every table's bags at once, table j reading row ``offset_rows[j]`` of the
  [T, B] ``offsets``; contract in ``dlrmc.frontend.ops``;
- ``dlrmc::embedding_bags_flat(weights[], indices, offsets, row_weights[], mode)``: the same
  from the flat layout (``dlrmc.frontend.ops``), the one the artifact takes.

The compiler's graph rewrites insert the first three; the DLRM's flat forward
(``dlrmc.frontend.model``) calls the last; the Relax lowering maps them to our kernels.
"""

from __future__ import annotations

import torch

from .ops import POOLING_MODES, interaction_pairs, num_pairs


def _stack(features: list[torch.Tensor]) -> torch.Tensor:
    return features[0] if len(features) == 1 and features[0].dim() == 3 else torch.stack(features, 1)


@torch.library.custom_op("dlrmc::dot_interaction", mutates_args=())
def dot_interaction(features: list[torch.Tensor], self_interaction: bool,
                    prepend_dense: bool) -> torch.Tensor:
    """``features``: F tensors [B, D], or one [B, F, D]."""
    t = _stack(features)
    z = torch.bmm(t, t.transpose(1, 2))
    li, lj = (torch.from_numpy(p) for p in interaction_pairs(t.shape[1], self_interaction))
    flat = z[:, li, lj]
    return torch.cat([t[:, 0, :], flat], dim=1) if prepend_dense else flat.contiguous()


@dot_interaction.register_fake
def _(features, self_interaction, prepend_dense):
    t = features[0]
    n, d = (t.shape[1], t.shape[2]) if t.dim() == 3 else (len(features), t.shape[1])
    return t.new_empty((t.shape[0], num_pairs(n, self_interaction) + (d if prepend_dense else 0)))


@torch.library.custom_op("dlrmc::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           activation: str) -> torch.Tensor:
    y = torch.nn.functional.linear(x, weight, bias)
    if activation == "relu":
        return torch.relu(y)
    if activation == "sigmoid":
        return torch.sigmoid(y)
    return y.clone()


@linear.register_fake
def _(x, weight, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("dlrmc::cross_linear", mutates_args=())
def cross_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 x0: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
    """A DCN cross layer's second GEMM with the layer around it: x0 * (x W^T + b) + xl."""
    return x0 * torch.nn.functional.linear(x, weight, bias) + xl


@cross_linear.register_fake
def _(x, weight, bias, x0, xl):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("dlrmc::embedding_bags", mutates_args=())
def embedding_bags(weights: list[torch.Tensor], indices: list[torch.Tensor], offsets: torch.Tensor,
                   per_sample_weights: list[torch.Tensor], mode: int,
                   offset_rows: list[int]) -> list[torch.Tensor]:
    psw = per_sample_weights or [None] * len(weights)
    return [torch.nn.functional.embedding_bag(i, w, offsets[r], mode=POOLING_MODES[mode],
                                              per_sample_weights=s)
            for w, i, r, s in zip(weights, indices, offset_rows, psw)]


@embedding_bags.register_fake
def _(weights, indices, offsets, per_sample_weights, mode, offset_rows):
    return [w.new_empty((offsets.shape[1], w.shape[1])) for w in weights]


@torch.library.custom_op("dlrmc::embedding_bags_flat", mutates_args=())
def embedding_bags_flat(weights: list[torch.Tensor], indices: torch.Tensor, offsets: torch.Tensor,
                        row_weights: list[torch.Tensor], mode: int) -> list[torch.Tensor]:
    tables = len(weights)
    batch = (offsets.shape[0] - 1) // tables
    out = []
    for t, w in enumerate(weights):
        bags = offsets[t * batch:(t + 1) * batch + 1]
        idx = indices[int(bags[0]):int(bags[-1])]
        out.append(torch.nn.functional.embedding_bag(
            idx, w, bags[:-1] - bags[0], mode=POOLING_MODES[mode],
            per_sample_weights=row_weights[t][idx] if row_weights else None))
    return out


@embedding_bags_flat.register_fake
def _(weights, indices, offsets, row_weights, mode):
    # On the offsets' device: the tables may be meta tensors (drawn only as they are
    # written, ``dlrmc.frontend.model.DLRM(lazy_tables=True)``).
    batch = (offsets.shape[0] - 1) // len(weights)
    return [offsets.new_empty((batch, w.shape[1]), dtype=w.dtype) for w in weights]
