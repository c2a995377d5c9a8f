"""Our kernels against the numpy oracles, and the oracles against PyTorch, over generated shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings, strategies as st

from dlrmc.frontend import ops as ref
from dlrmc.schedules.dense import dense_kernel, dense_narrow_kernel, narrow, pack_kernel
from dlrmc.schedules.embedding_bag import (dequantize_rows, embedding_bag_kernel,
                                           embedding_bags_kernel, quantize_rows)
from dlrmc.frontend.ops import num_pairs
from dlrmc.schedules.interaction import dot_interaction_kernel

TARGET = tvm.target.Target({"kind": "llvm"})
_BUILT: dict = {}


def _build(make, *config):
    """Build ``make(*config)`` once per configuration."""
    key = (make.__name__,) + config
    if key not in _BUILT:
        func = make(*config).with_attr("global_symbol", "main")
        _BUILT[key] = tvm.compile(tvm.IRModule({"main": func}), TARGET)["main"]
    return _BUILT[key]


@st.composite
def bag_cases(draw):
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    weighted = mode == "sum" and draw(st.booleans())
    dim = draw(st.sampled_from([1, 3, 16, 17, 33]))
    rows = draw(st.integers(3, 40))
    sizes = draw(st.lists(st.integers(0, 50), min_size=1, max_size=12))
    pad = draw(st.sampled_from([None, None, 0, 2]))
    return dict(mode=mode, weighted=weighted, dim=dim, rows=rows, sizes=sizes, pad=pad,
                last=draw(st.booleans()), dtype=draw(st.sampled_from(["int32", "int64"])),
                seed=draw(st.integers(0, 2**31)))


def _bag_inputs(case):
    rng = np.random.default_rng(case["seed"])
    weight = rng.standard_normal((case["rows"], case["dim"])).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(case["sizes"])]).astype(case["dtype"])
    indices = rng.integers(0, case["rows"], int(starts[-1])).astype(case["dtype"])
    psw = rng.standard_normal(len(indices)).astype(np.float32) if case["weighted"] else None
    offsets = starts if case["last"] else starts[:-1]
    return weight, indices, offsets, psw


@settings(max_examples=60, deadline=None)
@given(bag_cases())
def test_embedding_bag_kernel_matches_oracle(case):
    weight, indices, offsets, psw = _bag_inputs(case)
    fn = _build(embedding_bag_kernel, case["dim"], case["mode"], case["weighted"], case["dtype"],
                case["last"], case["pad"])
    out = tvm.runtime.tensor(np.full((len(case["sizes"]), case["dim"]), np.nan, np.float32))
    args = [weight, indices, offsets] + ([psw] if psw is not None else [])
    fn(*[tvm.runtime.tensor(a) for a in args], out)
    expected = ref.embedding_bag(weight, indices, offsets, case["mode"], psw, case["last"],
                                 case["pad"])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(bag_cases())
def test_embedding_bag_oracle_matches_pytorch(case):
    weight, indices, offsets, psw = _bag_inputs(case)
    got = ref.embedding_bag(weight, indices, offsets, case["mode"], psw, case["last"], case["pad"])
    bag = torch.nn.EmbeddingBag.from_pretrained(
        torch.from_numpy(weight), mode=case["mode"], include_last_offset=case["last"],
        padding_idx=case["pad"])
    want = bag(torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(offsets.astype(np.int64)),
               per_sample_weights=None if psw is None else torch.from_numpy(psw))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)


@st.composite
def flat_cases(draw):
    """A flat-layout batch (the artifact's own input): T tables, B bags each, any sizes."""
    tables, batch = draw(st.integers(1, 6)), draw(st.integers(1, 70))
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    return dict(tables=tables, batch=batch, mode=mode, dim=draw(st.sampled_from([1, 4, 16, 19])),
                rows=draw(st.lists(st.integers(1, 30), min_size=tables, max_size=tables)),
                sizes=draw(st.lists(st.integers(0, 5), min_size=tables * batch,
                                    max_size=tables * batch)),
                weighted=mode == "sum" and draw(st.booleans()),
                quant=draw(st.sampled_from([None, None, "int8", "int4"])),
                dtype=draw(st.sampled_from(["int32", "int64"])),
                static=draw(st.booleans()), prefetch=draw(st.sampled_from([0, 4, 16])),
                one_output=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=40, deadline=None)
@given(flat_cases())
def test_flat_embedding_bags_kernel(case):
    """The table-batched kernel on the flat layout against the numpy oracle (quantised tables:
    against the rows they stand for) and the oracle against PyTorch's EmbeddingBag."""
    rng = np.random.default_rng(case["seed"])
    T, B, D, quant = case["tables"], case["batch"], case["dim"], case["quant"]
    weights = [rng.standard_normal((r, D)).astype(np.float32) for r in case["rows"]]
    offsets = np.concatenate([[0], np.cumsum(case["sizes"])]).astype(case["dtype"])
    table_of = np.repeat(np.arange(T), [sum(case["sizes"][t * B:(t + 1) * B]) for t in range(T)])
    indices = (rng.random(len(table_of)) * np.array(case["rows"])[table_of]).astype(case["dtype"])
    rw = [rng.standard_normal(r).astype(np.float32) for r in case["rows"]] \
        if case["weighted"] else None
    stored = [quantize_rows(w, quant) for w in weights] if quant else weights
    seen = [dequantize_rows(w, D, quant) for w in stored] if quant else weights
    one = case["one_output"]           # the tables as one [T, B, D] output, or T [B, D]

    def fresh_outputs():
        if one:
            return [tvm.runtime.tensor(np.full((T, B, D), np.nan, np.float32))]
        return [tvm.runtime.tensor(np.full((B, D), np.nan, np.float32)) for _ in range(T)]

    fn = _build(embedding_bags_kernel, D, case["mode"], case["weighted"], case["dtype"], False,
                None, None, B if case["static"] else None, case["prefetch"], quant, T, one)
    outs = fresh_outputs()
    fn(*[tvm.runtime.tensor(a) for a in [*stored, indices, offsets, *(rw or [])]], *outs)
    expected = ref.embedding_bags_flat(seen, indices, offsets, case["mode"], rw)
    got = outs[0].numpy() if one else [o.numpy() for o in outs]
    for t, want in enumerate(expected):
        np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-5)
    lS_o, lS_i = ref.reference_layout(indices, offsets, T)
    for t, want in enumerate(ref.embedding_bags_flat(weights, indices, offsets, case["mode"], rw)):
        bag = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(weights[t]),
                                                    mode=case["mode"])
        idx = torch.from_numpy(lS_i[t].astype(np.int64))
        got = bag(idx, torch.from_numpy(lS_o[t]),
                  per_sample_weights=None if rw is None else torch.from_numpy(rw[t])[idx])
        np.testing.assert_allclose(want, got.detach().numpy(), rtol=1e-5, atol=1e-5)
    back = ref.flat_layout(lS_o, lS_i)
    np.testing.assert_array_equal(back[0], indices)
    np.testing.assert_array_equal(back[1], offsets)
    # The kernel checks the flat batch itself: each way a batch can point outside a table is
    # refused before anything is written.
    bad = []
    if len(indices):
        p = int(rng.integers(len(indices)))
        for value in (case["rows"][table_of[p]], -1):     # its own table's end, negative
            idx = indices.copy()
            idx[p] = value
            bad.append((idx, offsets))
    # first bag not at 0, last offset not the index count, an offset above the next
    changes = [(0, 1), (-1, offsets[-1] + 1), (-1, offsets[-1] - 1)]
    if T * B > 1:
        k = int(rng.integers(1, T * B))
        changes.append((k, offsets[k + 1] + 1))
    for at, value in changes:
        off = offsets.copy()
        off[at] = value
        bad.append((indices, off))
    for idx, off in bad:
        outs = fresh_outputs()
        with pytest.raises(ValueError, match=ref.BAD_FLAT_INPUT):
            fn(*[tvm.runtime.tensor(a) for a in [*stored, idx, off, *(rw or [])]], *outs)
        assert all(np.isnan(o.numpy()).all() for o in outs)


@pytest.mark.parametrize("features", [1, 2, 5, 27])
@pytest.mark.parametrize("dim", [1, 4, 16, 19, 36])
@pytest.mark.parametrize("itself", [False, True])
@pytest.mark.parametrize("prepend", [False, True])
def test_dot_interaction_kernel_and_oracle(features, dim, itself, prepend):
    """Every layout; the features transposed lanes x lanes in registers (whole blocks,
    zero features past F) and element by element (the rest of D)."""
    rng = np.random.default_rng(features * 100 + dim)
    batch = 70 if dim % 2 else 7           # both the parallel and the serial path
    t = rng.standard_normal((batch, features, dim)).astype(np.float32)
    expected = ref.dot_interaction(t, itself, prepend)
    assert expected.shape == (batch, num_pairs(features, itself) + (dim if prepend else 0))
    # The oracle against the reference's own formulation in torch.
    tt = torch.from_numpy(t)
    z = torch.bmm(tt, tt.transpose(1, 2))
    off = 1 if itself else 0
    li = torch.tensor([i for i in range(features) for j in range(i + off)], dtype=torch.long)
    lj = torch.tensor([j for i in range(features) for j in range(i + off)], dtype=torch.long)
    want = z[:, li, lj]
    if prepend:
        want = torch.cat([tt[:, 0, :], want], dim=1)
    np.testing.assert_allclose(expected, want.numpy(), rtol=1e-5, atol=1e-5)
    lanes = 8 if dim % 2 else 4 if dim == 4 else 16      # AVX2's, NEON's and AVX-512's
    layouts = {"features": [np.ascontiguousarray(t[:, k]) for k in range(features)],
               "stacked": [t],     # [B, F, D]; and x with the embedding kernel's [F-1, B, D]:
               "tables": [np.ascontiguousarray(t[:, 0]),
                          np.ascontiguousarray(t[:, 1:].transpose(1, 0, 2))]}
    for layout, inputs in layouts.items():
        if layout == "tables" and features == 1:
            continue
        out = tvm.runtime.tensor(np.full(expected.shape, np.nan, np.float32))
        fn = _build(dot_interaction_kernel, features, dim, itself, prepend, lanes,
                    layout == "stacked", None, "fp32", layout == "tables")
        fn(*[tvm.runtime.tensor(a) for a in inputs], out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_configuration():
    with pytest.raises(ValueError, match="mode"):
        embedding_bag_kernel(4, "median")
    with pytest.raises(ValueError, match="per_sample_weights"):
        embedding_bag_kernel(4, "max", weighted=True)


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False),
                                           ("max", False)])
def test_embedding_bag_kernel_parallel_path(mode, weighted):
    # 300 bags take the multi-threaded path (PARALLEL_MIN_BAGS); the cases above the serial one.
    case = dict(mode=mode, weighted=weighted, dim=19, rows=50, pad=2, last=False,
                dtype="int64", seed=3, sizes=list(np.random.default_rng(0).integers(0, 9, 300)))
    weight, indices, offsets, psw = _bag_inputs(case)
    fn = _build(embedding_bag_kernel, 19, mode, weighted, "int64", False, 2)
    out = tvm.runtime.tensor(np.full((300, 19), np.nan, np.float32))
    args = [weight, indices, offsets] + ([psw] if psw is not None else [])
    fn(*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref.embedding_bag(weight, indices, offsets, mode, psw,
                                                              False, 2), rtol=1e-5, atol=1e-5)


def _pack(weight: np.ndarray, nr: int) -> np.ndarray:
    n, k = weight.shape
    padded = np.zeros((-(-n // nr) * nr, k), np.float32)
    padded[:n] = weight
    return np.ascontiguousarray(padded.reshape(-1, nr, k).transpose(0, 2, 1))


@pytest.mark.parametrize("mr,nr", [(6, 32), (6, 16), (4, 8)])      # AVX-512, AVX2/NEON, SSE
@pytest.mark.parametrize("n,k", [(1, 7), (16, 13), (33, 64), (64, 5), (100, 1)])
@pytest.mark.parametrize("act", ["none", "relu", "sigmoid", "cross"])
def test_dense_kernel_and_packing(mr, nr, n, k, act):
    """"cross": a DCN cross layer in the epilogue, x0 * (x W^T + b) + xl."""
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    pack = _build(pack_kernel, n, k, nr)
    packed = tvm.runtime.tensor(np.full((-(-n // nr), k, nr), np.nan, np.float32))
    pack(tvm.runtime.tensor(w), packed)
    np.testing.assert_array_equal(packed.numpy(), _pack(w, nr))
    for parallel in (False, True):
        fn = _build(dense_kernel, n, k, act, mr, nr, 0 if parallel else 1 << 62)
        for m in (1, mr - 1, mr, 2 * mr + 1, 64):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
            if act == "cross":
                x0, xl = rng.standard_normal((2, m, n)).astype(np.float32)
                fn(tvm.runtime.tensor(x), packed, tvm.runtime.tensor(b), tvm.runtime.tensor(x0),
                   tvm.runtime.tensor(xl), y)
                want = x0 * ref.dense(x, w, b, "none") + xl
            else:
                fn(tvm.runtime.tensor(x), packed, tvm.runtime.tensor(b), y)
                want = ref.dense(x, w, b, act)
            np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4,
                                       err_msg=f"M={m} parallel={parallel}")


# every layer shape that is narrow at each vector width: AVX-512, AVX2, SSE/NEON
NARROW_CASES = [(lanes, n, k) for lanes in (16, 8, 4)
                for n, k in [(1, 1), (1, 7), (1, 256), (2, 45), (4, 33), (1, 367)]
                if narrow(n, lanes)]


@pytest.mark.parametrize("lanes,n,k", NARROW_CASES)
@pytest.mark.parametrize("act", ["none", "relu", "sigmoid"])
def test_dense_narrow_kernel(lanes, n, k, act):
    """The last layer's kernel (N at most a quarter of a vector, W unpacked) at any batch
    and at static ones, serial and parallel, over whole, part and no vectors of K."""
    from dlrmc.schedules import work_rule

    rng = np.random.default_rng(n * 1000 + k + lanes)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    for parallel in (False, True):
        fns = {None: _build(dense_narrow_kernel, n, k, act, lanes, 0 if parallel else 1 << 62)}
        for m in (1, 7, 8, 9, 64):
            func = work_rule.apply_default(dense_narrow_kernel(n, k, act, lanes, 0 if parallel
                                                               else 1 << 62, m))
            fns[m] = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                 TARGET)["main"]
            for batch in (None, m):
                x = rng.standard_normal((m, k)).astype(np.float32)
                y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
                fns[batch](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(b), y)
                np.testing.assert_allclose(y.numpy(), ref.dense(x, w, b, act), rtol=1e-4,
                                           atol=1e-4, err_msg=f"M={m} batch={batch} "
                                                              f"parallel={parallel}")


@pytest.mark.parametrize("target", ["llvm -mcpu=skylake-avx512", "llvm -mcpu=haswell"])
def test_every_micro_tile_height_keeps_its_accumulators_off_the_heap(target):
    """Each MR the tuner may pick (fp32 and int8, static and any batch): no accumulator
    allocated from the heap, where an 8 x 32 AVX-512 tile's once went (TVM's 1 KB stack
    limit) and every FMA loaded and stored them, at a third of the speed. int8 allocates one
    workspace, its activations converted to words."""
    import re

    from dlrmc.schedules import work_rule
    from dlrmc.schedules.dense_lowp import dense_lowp_kernel
    from dlrmc.targets import parse_target
    from dlrmc.targets.knobs import cpu_knobs

    tgt = parse_target(target)
    knobs = cpu_knobs(tgt)
    for mr in knobs.mr_choices(knobs.nr):
        for batch in (None, 256):
            for kind, workspaces, func in (
                    ("fp32", 0, dense_kernel(100, 64, "relu", mr, knobs.nr, 0, batch)),
                    ("int8", 1, dense_lowp_kernel(100, 64, "relu", mr, knobs.nr, 0, batch,
                                                  "int8", knobs.has_dot("int8", knobs.nr)))):
                func = work_rule.apply_default(func).with_attr("global_symbol", "main")
                ir = tvm.compile(tvm.IRModule({"main": func}), tgt).mod.inspect_source("ll")
                found = len(re.findall(r"load ptr, ptr @__TVMBackendAllocWorkspace", ir))
                assert found == workspaces, (kind, mr, batch)


def test_dense_oracle_matches_pytorch():
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((9, 5), (3, 5), (3,)))
    lin = torch.nn.Linear(5, 3)
    lin.weight.data, lin.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    with torch.no_grad():
        y = lin(torch.from_numpy(x))
        np.testing.assert_allclose(ref.dense(x, w, b, "relu"), torch.relu(y).numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(ref.dense(x, w, b, "sigmoid"), torch.sigmoid(y).numpy(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        dense_kernel(3, 5, "gelu")


@pytest.mark.parametrize("widths", [(16, 16, 16), (3, 1, 7, 33), (5,) * 27])
@pytest.mark.parametrize("batch", [1, 9, 300])
def test_concat_kernel(widths, batch):
    from dlrmc.schedules.concat import concat_kernel

    rng = np.random.default_rng(batch)
    parts = [rng.standard_normal((batch, w)).astype(np.float32) for w in widths]
    out = tvm.runtime.tensor(np.full((batch, sum(widths)), np.nan, np.float32))
    _build(concat_kernel, widths)(*[tvm.runtime.tensor(p) for p in parts], out)
    np.testing.assert_array_equal(out.numpy(), np.concatenate(parts, axis=1))
