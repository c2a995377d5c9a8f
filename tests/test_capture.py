"""Capture paths: the interaction rewrite on exported graphs, and the torch.compile backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlrmc.compiler import dynamo_backend
from dlrmc.compiler.fx_passes import fuse_dot_interaction
from dlrmc.compiler.lower import LoweringError, lower
from dlrmc.frontend.arch import PRESETS, Arch
from dlrmc.frontend.export import example_inputs, export_model
from dlrmc.frontend.model import DLRM


@pytest.mark.parametrize("itself", [False, True])
def test_interaction_pattern_becomes_one_op(itself):
    arch = Arch(4, (10, 20, 30), (5, 8, 4), (7, 1), interaction_itself=itself)
    model = DLRM(arch).eval()
    ep = export_model(model, arch).run_decompositions()
    assert fuse_dot_interaction(ep) == 1
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.dlrmc.dot_interaction.default in targets
    assert torch.ops.aten.bmm.default not in targets and torch.ops.aten.index.Tensor not in targets
    fused = next(n for n in ep.graph.nodes if n.target == torch.ops.dlrmc.dot_interaction.default)
    assert fused.args[1:] == (itself, True)     # absorbed cat([x, Zflat])
    # The rewritten graph still computes the model.
    d, o, i = example_inputs(arch, 6, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(d, o, i), model(d, o, i))


def test_cat_interaction_has_no_dot_op():
    arch = Arch(4, (10, 20), (5, 4), (7, 1), interaction_op="cat")
    ep = export_model(DLRM(arch), arch).run_decompositions()
    assert fuse_dot_interaction(ep) == 0


def test_unsupported_operator_is_named():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.i0(x)

    ep = torch.export.export(Odd(), (torch.ones(3),))
    with pytest.raises(LoweringError, match="i0.default"):
        lower(ep)


def test_torch_compile_backend_matches_eager_and_caches():
    arch = PRESETS["tiny"]
    model = DLRM(arch, seed=2).eval()
    dynamo_backend._CACHE.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dlrmc", dynamic=False,
                             options={"target": "llvm -mcpu=skylake-avx512"})
    with torch.no_grad():
        for batch in (3, 8, 3):
            d, o, i = example_inputs(arch, batch, seed=batch)
            torch.testing.assert_close(compiled(d, o, list(i)), model(d, o, list(i)),
                                       rtol=1e-5, atol=2e-6)
    assert len(dynamo_backend._CACHE) == 2       # one per batch shape, reused for the repeat
    assert all(isinstance(v, dynamo_backend._Compiled) for v in dynamo_backend._CACHE.values())


def test_torch_compile_backend_falls_back_with_a_warning():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return torch.special.i0(x) + 1

    torch._dynamo.reset()
    x = torch.linspace(0, 2, 5)
    with pytest.warns(UserWarning, match="dlrmc: running this graph eagerly.*i0"):
        got = torch.compile(Odd(), backend="dlrmc", dynamic=False)(x)
    torch.testing.assert_close(got, torch.special.i0(x) + 1)
