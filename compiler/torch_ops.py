"""Our ops as torch custom ops, so a rewritten FX graph stays a runnable, typed torch graph.

- ``dlrmc::dot_interaction(features, self_interaction, prepend_dense)``: contract in
  ``dlrmc.schedules.interaction``;
- ``dlrmc::linear(x, weight, bias, activation)``: act(x @ weight^T + bias), contract in
  ``dlrmc.schedules.dense``.

The compiler's graph rewrites insert them; the Relax lowering maps them to our kernels.
"""

from __future__ import annotations

import torch


def _pairs(n: int, itself: bool):
    extra = 1 if itself else 0
    li = [i for i in range(n) for _ in range(i + extra)]
    lj = [j for i in range(n) for j in range(i + extra)]
    return li, lj


@torch.library.custom_op("dlrmc::dot_interaction", mutates_args=())
def dot_interaction(features: torch.Tensor, self_interaction: bool, prepend_dense: bool) -> torch.Tensor:
    z = torch.bmm(features, features.transpose(1, 2))
    li, lj = _pairs(features.shape[1], self_interaction)
    flat = z[:, li, lj]
    return torch.cat([features[:, 0, :], flat], dim=1) if prepend_dense else flat.contiguous()


@dot_interaction.register_fake
def _(features, self_interaction, prepend_dense):
    n = features.shape[1]
    pairs = n * (n + 1) // 2 if self_interaction else n * (n - 1) // 2
    width = pairs + (features.shape[2] if prepend_dense else 0)
    return features.new_empty((features.shape[0], width))


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
