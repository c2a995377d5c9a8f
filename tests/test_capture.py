"""Capture paths: the interaction rewrite on exported graphs, and the torch.compile backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from dlrmc.compiler import dynamo_backend
from dlrmc.compiler.build import TRANSFORM_PARAMS, build
from dlrmc.compiler.fx_passes import fuse_dot_interaction
from dlrmc.compiler.lower import LoweringError, lower
from dlrmc.frontend.arch import PRESETS, Arch
from dlrmc.frontend.export import example_batch, example_inputs, export_model
from dlrmc.frontend.model import DLRM

from conftest import foreign_target, widest_runnable_target


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
    assert len(fused.args[0]) == 4              # reads x, e_1..e_3 in place: no concat
    # The rewritten graph still computes the model.
    d, o, i = example_batch(arch, 6, seed=1)
    with torch.no_grad():      # the program takes the flat layout of the same batch
        torch.testing.assert_close(ep.module()(*example_inputs(arch, 6, seed=1)), model(d, o, i))


class _OwnDLRM(torch.nn.Module):
    """A DLRM as users write their own: the Gram matrix by ``@`` (which export decomposes
    into expand/view/bmm) and the pairs from ``torch.tril_indices`` or ``triu_indices`` (ops
    in the graph, not constants)."""

    def __init__(self, tables=(13, 7, 29), dim=4, upper=False, itself=False):
        super().__init__()
        torch.manual_seed(0)
        n = len(tables) + 1
        self.upper, self.offset = upper, (0 if itself else (1 if upper else -1))
        self.emb = torch.nn.ModuleList(torch.nn.EmbeddingBag(r, dim, mode="sum") for r in tables)
        self.bot = torch.nn.Sequential(torch.nn.Linear(5, dim), torch.nn.ReLU())
        pairs = n * (n + 1) // 2 if itself else n * (n - 1) // 2
        self.top = torch.nn.Sequential(torch.nn.Linear(dim + pairs, 6), torch.nn.ReLU(),
                                       torch.nn.Linear(6, 1))

    def forward(self, dense, offsets, indices):
        x = self.bot(dense)
        feats = torch.stack([x] + [e(indices[k], offsets[k]) for k, e in enumerate(self.emb)], 1)
        z = feats @ feats.transpose(1, 2)
        make = torch.triu_indices if self.upper else torch.tril_indices
        rows, cols = make(feats.shape[1], feats.shape[1], self.offset)
        return torch.sigmoid(self.top(torch.cat([x, z[:, rows, cols]], 1)))


@pytest.mark.parametrize("upper,itself", [(False, False), (False, True), (True, False)])
def test_a_users_own_dlrm_compiles_through_torch_compile(upper, itself):
    """Its lower triangle becomes our interaction op; the upper one (TorchRec's order) is no
    triangle of ours, so it lowers as it is written, the pairs as a constant. Before, both ran
    eagerly: tril_indices had no lowering."""
    import warnings

    net = _OwnDLRM(upper=upper, itself=itself).eval()
    rng = np.random.default_rng(3)
    dense = torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32))
    lens = rng.integers(0, 4, (3, 6))
    offsets = torch.from_numpy(np.concatenate([np.zeros((3, 1), np.int64),
                                               np.cumsum(lens, 1)[:, :-1]], 1))
    indices = [torch.from_numpy(rng.integers(0, n, int(lens[k].sum())))
               for k, n in enumerate((13, 7, 29))]
    ep = torch.export.export(net, (dense, offsets, indices)).run_decompositions()
    assert fuse_dot_interaction(ep) == (0 if upper else 1)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dlrmc: running this graph eagerly")
        got = torch.compile(net, backend="dlrmc", dynamic=False)(dense, offsets, indices)
    with torch.no_grad():
        torch.testing.assert_close(got, net(dense, offsets, indices))


def test_joint_index_tensors_pick_pairs_not_their_outer_product():
    """x[:, a, b] and x[:, :, a, b] with index tensors given at run time, negative ones
    included (counted from the end, as torch does)."""
    from tvm import relax

    class Pick(torch.nn.Module):
        def forward(self, x, y, a, b):
            return torch.cat([x[:, a, b], y[:, :, a, b].flatten(1)], 1)

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((3, 5, 4)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((3, 2, 5, 4)).astype(np.float32))
    target = tvm.target.Target({"kind": "llvm"})
    lowered = lower(torch.export.export(Pick(), (x, y, torch.zeros(7, dtype=torch.int64),
                                                 torch.zeros(7, dtype=torch.int64))), target)
    vm = relax.VirtualMachine(build(lowered, target)[0], tvm.cpu())
    for seed in range(3):
        pick = np.random.default_rng(seed)
        a, b = torch.from_numpy(pick.integers(-5, 5, 7)), torch.from_numpy(pick.integers(-4, 4, 7))
        got = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in (x, y, a, b)]).numpy()
        np.testing.assert_array_equal(got, Pick()(x, y, a, b).numpy())


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
        lower(ep, tvm.target.Target({"kind": "llvm"}))


def test_torch_compile_backend_matches_eager_and_caches():
    arch = PRESETS["tiny"]
    model = DLRM(arch, seed=2).eval()
    dynamo_backend._CACHE.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dlrmc", dynamic=False,
                             options={"target": widest_runnable_target()})
    with torch.no_grad():
        for batch in (3, 8, 3):
            d, o, i = example_batch(arch, batch, seed=batch)
            torch.testing.assert_close(compiled(d, o, list(i)), model(d, o, list(i)),
                                       rtol=1e-5, atol=2e-6)
    assert len(dynamo_backend._CACHE) == 2       # one per batch shape, reused for the repeat
    assert all(isinstance(v, dynamo_backend._Compiled) for v in dynamo_backend._CACHE.values())


def test_torch_compile_backend_refuses_a_target_this_cpu_cannot_run():
    """Code for a CPU feature this one lacks would die of SIGILL: refused with the runtime's
    message before anything is compiled or run."""
    arch = PRESETS["tiny"]
    model = DLRM(arch, seed=2).eval()
    dynamo_backend._CACHE.clear()
    torch._dynamo.reset()
    target = foreign_target()
    compiled = torch.compile(model, backend="dlrmc", dynamic=False, options={"target": target})
    d, o, i = example_batch(arch, 3, seed=1)
    with torch.no_grad(), pytest.raises(Exception, match="needs CPU features this CPU lacks"):
        compiled(d, o, list(i))
    assert not dynamo_backend._CACHE


def test_torch_compile_backend_with_dynamos_dynamic_shapes():
    import warnings

    arch = PRESETS["tiny"]
    model = DLRM(arch, seed=6).eval()
    dynamo_backend._CACHE.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dlrmc")      # Dynamo marks the batch dynamic
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="dlrmc")
        for batch in (3, 5, 9, 5):
            d, o, i = example_batch(arch, batch, seed=batch)
            torch.testing.assert_close(compiled(d, o, list(i)), model(d, o, list(i)),
                                       rtol=1e-5, atol=2e-6)
    assert len(dynamo_backend._CACHE) == 3
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


class _Bags(torch.nn.Module):
    """Every embedding-bag variant torch.export can emit, beside a plain matmul."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(11, 5, generator=g))
        self.sum_pad = torch.nn.EmbeddingBag(9, 5, mode="sum", padding_idx=2)
        self.mean_last = torch.nn.EmbeddingBag(9, 3, mode="mean", include_last_offset=True)
        self.max_pad = torch.nn.EmbeddingBag(9, 6, mode="max", padding_idx=0)
        self.weighted = torch.nn.EmbeddingBag(9, 4, mode="sum")

    def forward(self, idx, off, off_last, psw):
        return torch.cat([self.sum_pad(idx, off), self.mean_last(idx, off_last),
                          self.max_pad(idx, off), self.weighted(idx, off, per_sample_weights=psw),
                          torch.nn.functional.embedding_bag(idx, self.w, off, mode="mean")], 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_embedding_bag_variants_lower_correctly(dtype):
    import tvm
    from tvm import relax


    model = _Bags().eval()
    rng = np.random.default_rng(0)

    def batch(b):
        sizes = rng.integers(0, 6, b)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        idx = torch.from_numpy(rng.integers(0, 9, int(starts[-1]))).to(dtype)
        idx[::3] = 2  # padding entries
        return (idx, torch.from_numpy(starts[:-1]).to(dtype), torch.from_numpy(starts).to(dtype),
                torch.from_numpy(rng.standard_normal(len(idx)).astype(np.float32)))

    b_dim = torch.export.Dim("b", min=1)
    n_dim = torch.export.Dim("n", min=0)
    with torch.no_grad():
        ep = torch.export.export(model, batch(5), dynamic_shapes=(
            {0: n_dim}, {0: b_dim}, {0: b_dim + 1}, {0: n_dim}))
    lowered = lower(ep, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(build(lowered, tvm.target.Target({"kind": "llvm"}))[0], tvm.cpu())
    params = vm[TRANSFORM_PARAMS]([tvm.runtime.tensor(p) for p in lowered.params])
    for b in (1, 4, 33):
        args = batch(b)
        got = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args], *params).numpy()
        with torch.no_grad():
            np.testing.assert_allclose(got, model(*args).numpy(), rtol=1e-5, atol=1e-5)


def test_every_linear_layer_becomes_one_fused_op():
    from dlrmc.compiler.fx_passes import fuse_linear

    arch = Arch(4, (10, 20), (5, 8, 6, 4), (7, 3, 1))
    model = DLRM(arch).eval()
    ep = export_model(model, arch).run_decompositions()
    assert fuse_linear(ep) == 6
    fused = [n for n in ep.graph.nodes if n.target == torch.ops.dlrmc.linear.default]
    assert [n.args[3] for n in fused] == ["relu"] * 5 + ["sigmoid"]
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert not targets & {torch.ops.aten.addmm.default, torch.ops.aten.relu.default,
                          torch.ops.aten.sigmoid.default}
    d, o, i = example_batch(arch, 5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*example_inputs(arch, 5, seed=3)), model(d, o, i))


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 3e-2), ("fp16", 5e-3),
                                            ("int8", 5e-2)])
def test_each_cross_layer_is_one_gemm_with_the_layer_in_its_epilogue(precision, tol):
    """DCN: x0 * (W (V x) + b) + x becomes the V GEMM and a W GEMM whose epilogue does the
    rest, in every precision (int8: ``--mlp-quant``, calibrated), matching eager (within the
    type's rounding)."""
    from tvm import relax

    arch = Arch(6, (10, 20, 3), (5, 6), (7, 1), interaction_op="dcn", dcn_layers=3,
                dcn_low_rank=4, output="logit")
    model = DLRM(arch, seed=2).eval()
    target = tvm.target.Target({"kind": "llvm"})
    numerics = {"mlp_quant": "int8", "calibration": [
        [np.asarray(x) if torch.is_tensor(x) else [np.asarray(i) for i in x]
         for x in example_batch(arch, 64, seed=s)] for s in (1, 2)]} \
        if precision == "int8" else {"precision": precision}
    lowered = lower(export_model(model, arch), target, **numerics)
    names = [gv.name_hint for gv in lowered.mod.get_global_vars()]
    kernel = "dense_24x4_cross" if precision == "fp32" else f"dense_{precision}_24x4_cross"
    # one kernel for the three layers' shape (int8: one each, holding its calibrated scale)
    assert sum(n.startswith(kernel) for n in names) == (3 if precision == "int8" else 1)
    assert lowered.mod["main"].script().count(kernel) == 3
    vm = relax.VirtualMachine(build(lowered, target)[0], tvm.cpu())
    params = vm[TRANSFORM_PARAMS]([tvm.runtime.tensor(p) for p in lowered.params])
    for b in (1, 7, 40):
        inputs = example_inputs(arch, b, seed=b)
        got = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in inputs], *params).numpy()
        with torch.no_grad():
            want = model(*example_batch(arch, b, seed=b)).numpy()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        assert precision == "fp32" or np.abs(got - want).max() > 0     # it did round


def test_linear_without_bias_and_without_activation():
    import tvm
    from tvm import relax

    from dlrmc.schedules.kernels import recipe

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(7, 19, bias=False)
            self.b = torch.nn.Linear(19, 2)      # narrow: a quarter of an AVX2 vector

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Mlp().eval()
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(4, 7),),
                                 dynamic_shapes=({0: torch.export.Dim("b", min=1)},))
    lowered = lower(ep, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    kernels = {gv.name_hint: recipe(lowered.mod[gv]) for gv in lowered.mod.get_global_vars()}
    assert kernels["dense_19x7_none"]["kernel"] == "dense"
    assert kernels["dense_2x19_none"]["kernel"] == "dense_narrow"     # W unpacked
    vm = relax.VirtualMachine(build(lowered, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))[0],
                              tvm.cpu())
    params = vm[TRANSFORM_PARAMS]([tvm.runtime.tensor(p) for p in lowered.params])
    for b in (1, 6, 13):
        x = torch.randn(b, 7)
        with torch.no_grad():
            np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x.numpy()), *params).numpy(),
                                       model(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [PRESETS["tiny"], Arch(4, (5, 6, 7), (3, 4), (2, 1),
                                                        weighted_pooling="learned")])
def test_tables_are_batched_into_one_kernel(arch):
    """A reference-layout graph (a user's model through torch.compile): the per-table bags
    over rows of one offset matrix become one table-batched op."""
    from dlrmc.compiler.fx_passes import batch_embedding_bags

    model = DLRM(arch).eval()
    batch = torch.export.Dim("batch", min=1)
    dims = {"dense_x": {0: batch}, "lS_o": {1: batch},
            "lS_i": tuple({0: torch.export.Dim(f"n{k}", min=0)} for k in range(arch.num_tables))}
    with torch.no_grad():
        ep = torch.export.export(model, example_batch(arch), dynamic_shapes=dims)
    ep = ep.run_decompositions()
    assert batch_embedding_bags(ep) == arch.num_tables
    (tbe,) = [n for n in ep.graph.nodes if n.target == torch.ops.dlrmc.embedding_bags.default]
    assert tbe.args[5] == list(range(arch.num_tables))
    assert not [n for n in ep.graph.nodes if n.target in (
        torch.ops.aten._embedding_bag.default, torch.ops.aten._embedding_bag_forward_only.default)]
    d, o, i = example_batch(arch, 7, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(d, o, i), model(d, o, i))


@pytest.mark.parametrize("arch", [PRESETS["tiny"], Arch(4, (5, 6, 7), (3, 4), (2, 1),
                                                        weighted_pooling="learned"),
                                  Arch(4, (5, 6), (3, 4), (2, 1), pooling="max")])
def test_the_artifact_program_takes_the_flat_layout(arch):
    """What dlrm-compile captures: (dense_x, indices, offsets), every table pooled by one
    flat op, computing what the reference-layout model computes."""
    model = DLRM(arch, seed=4).eval()
    ep = export_model(model, arch)
    assert list(ep.graph_signature.user_inputs) == ["dense_x", "indices", "offsets"]
    ops = [n for n in ep.graph.nodes if n.target == torch.ops.dlrmc.embedding_bags_flat.default]
    assert len(ops) == 1 and len(ops[0].args[0]) == arch.num_tables
    for batch in (2, 5, 9):
        d, o, i = example_batch(arch, batch, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(*example_inputs(arch, batch, seed=batch)),
                                       model(d, o, i))


@pytest.mark.parametrize("arch, one", [
    (Arch(5, (9, 4, 7), (3, 5), (4, 1)), True),
    (Arch(4, (9, 4, 7, 3), (3, 4), (6, 1), interaction_itself=True, pooling="max"), True),
    (Arch(3, (11, 5), (2, 3), (4, 1), interaction_op="cat"), False),
], ids=["dot", "dot-itself-max", "cat"])
def test_bags_feeding_the_dot_interaction_are_one_tensor_it_reads_in_place(arch, one):
    """CPU: when every table goes to the dot interaction, the table-batched kernel writes them
    as one [T, B, D] tensor and the interaction takes it with the dense features (two
    arguments, not T + 1); any other consumer gets one [B, D] per table. Either way the
    model computes what eager does."""
    from tvm import relax

    model = DLRM(arch, seed=3).eval()
    target = tvm.target.Target({"kind": "llvm"})
    lowered = lower(export_model(model, arch), target)
    calls = {}
    for block in lowered.mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and isinstance(v.args[0], tvm.ir.GlobalVar):
                calls[v.args[0].name_hint.rstrip("0123456789_")] = v
    bags = calls["embedding_bags"]
    from dlrmc.schedules.embedding_bag import PREFETCH
    from dlrmc.schedules.kernels import recipe
    # and prefetches rows ahead (test_kernels holds every distance to the oracle)
    assert recipe(lowered.mod[bags.args[0]])["args"]["prefetch"] == PREFETCH
    if one:
        assert len(bags.ty.shape) == 3 and int(bags.ty.shape[0]) == arch.num_tables
        assert len(calls["dot_interaction"].args[1].fields) == 2
    else:
        assert isinstance(bags.ty, relax.TupleType) and len(bags.ty.fields) == arch.num_tables
    vm = relax.VirtualMachine(build(lowered, target)[0], tvm.cpu())
    params = vm[TRANSFORM_PARAMS]([tvm.runtime.tensor(p) for p in lowered.params])
    for b in (1, 6, 70):
        got = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in example_inputs(arch, b, seed=b)],
                         *params).numpy()
        with torch.no_grad():
            np.testing.assert_allclose(got, model(*example_batch(arch, b, seed=b)).numpy(),
                                       rtol=1e-5, atol=1e-5)
