"""Reduced precision: the bf16/fp16/int8 dense kernels and the rounded interaction against the
numpy oracles (themselves checked against PyTorch), calibration, and whole models compiled
with --precision / --mlp-quant staying close to fp32."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import tvm

from dlrmc.compiler.numerics import activation_qparams
from dlrmc.frontend import ops as ref
from dlrmc.schedules import work_rule
from dlrmc.schedules.dense_lowp import dense_lowp_kernel, pack_lowp_kernel, quantize_pack_kernel
from dlrmc.schedules.interaction import dot_interaction_kernel
from dlrmc.targets import parse_target
from dlrmc.targets.knobs import cpu_knobs

HOST = parse_target("host")
PORTABLE = tvm.target.Target({"kind": "llvm"})
HOST_KNOBS = cpu_knobs(HOST)


def _compile(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]


def _dots(kind):
    """(dot, target) pairs to test: the portable words, and the instruction where the host
    has it."""
    cases = [(False, PORTABLE)]
    if HOST_KNOBS.has_dot(kind, 16):
        cases.append((True, HOST))
    return cases


def _t(a):
    return tvm.runtime.tensor(a)


def test_rounding_oracle_matches_pytorch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    x[:4] = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 0]      # ties to even
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(ref.round_to(x, "bf16"), t.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(ref.round_to(x, "fp16"), t.half().float().numpy())


def test_int8_oracle_matches_pytorch_fake_quantisation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 37)).astype(np.float32)
    w = rng.standard_normal((9, 37)).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    scale, zero = activation_qparams(x.min(), x.max())
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    xq = torch.fake_quantize_per_tensor_affine(xt, scale, zero, 0, 255)
    w_scale = wt.abs().amax(1) / 127
    wq = torch.fake_quantize_per_channel_affine(wt, w_scale, torch.zeros(9, dtype=torch.int32),
                                                0, -127, 127)
    want = torch.relu(torch.nn.functional.linear(xq, wq, torch.from_numpy(b))).numpy()
    np.testing.assert_allclose(ref.dense_int8(x, w, b, "relu", scale, zero), want, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("lo,hi", [(0.0, 3.0), (-1.0, 1.0), (-5.0, -1.0), (2.0, 2.0), (0, 0)])
def test_activation_qparams_cover_the_range_and_zero(lo, hi):
    scale, zero = activation_qparams(lo, hi)
    assert 0 <= zero <= 255 and scale > 0
    assert (0 - zero) * scale <= min(lo, 0) + scale and (255 - zero) * scale >= max(hi, 0) - scale
    with pytest.raises(ValueError, match="non-finite"):
        activation_qparams(float("nan"), 1.0)


@pytest.mark.parametrize("kind", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("n,k", [(1, 7), (16, 13), (33, 64), (40, 367)])
@pytest.mark.parametrize("mr,nr", [(6, 16), (12, 32)])    # the AVX2 tile; AVX-512's tallest
def test_lowp_dense_kernels_match_oracle(kind, n, k, mr, nr):
    rng = np.random.default_rng(n * 1000 + k)
    w = (rng.standard_normal((n, k)) * 0.2).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    for dot, target in _dots(kind):
        for act in ("relu", "sigmoid", "cross"):
            xs = [rng.standard_normal((m, k)).astype(np.float32) for m in (1, 5, 6, 13, 25, 64)]
            if kind == "int8":
                x_scale, x_zero = activation_qparams(min(x.min() for x in xs),
                                                     max(x.max() for x in xs))
                packed = _t(np.zeros((-(-n // nr), -(-k // 4), nr), np.int32))
                terms = _t(np.zeros((2, n), np.float32))
                _compile(quantize_pack_kernel(n, k, nr, x_scale, x_zero), target)(
                    _t(w), _t(b), packed, terms)
                fn = _compile(dense_lowp_kernel(n, k, act, mr, nr, True, None, kind, dot, x_scale,
                                                x_zero), target)
                args, gemm = (packed, terms), lambda x, a: ref.dense_int8(x, w, b, a, x_scale,
                                                                         x_zero)
            else:
                per = 2 if kind == "bf16" else 1
                dtype = np.int32 if kind == "bf16" else np.float16
                packed = _t(np.zeros((-(-n // nr), -(-k // per), nr), dtype))
                _compile(pack_lowp_kernel(n, k, nr, kind), target)(_t(w), packed)
                fn = _compile(dense_lowp_kernel(n, k, act, mr, nr, True, None, kind, dot), target)
                args, gemm = (packed, _t(b)), lambda x, a: ref.dense(
                    ref.round_to(x, kind), ref.round_to(w, kind), b, a)
            for x in xs:
                y = _t(np.full((len(x), n), np.nan, np.float32))
                if act == "cross":   # x0 * (x W^T + b) + xl, x0 and xl float32
                    x0, xl = rng.standard_normal((2, len(x), n)).astype(np.float32)
                    fn(_t(x), *args, _t(x0), _t(xl), y)
                    want = x0 * gemm(x, "none") + xl
                else:
                    fn(_t(x), *args, y)
                    want = gemm(x, act)
                np.testing.assert_allclose(y.numpy(), want, rtol=2e-4, atol=2e-4,
                                           err_msg=f"{kind} dot={dot} act={act} M={len(x)}")


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("batch,min_bytes", [(1, 0), (3, 1), (1, 1), (7, 0), (64, 0)])
def test_lowp_dense_static_batch(kind, batch, min_bytes):
    """The bucket form: static batch, work loops under the dlrmc_work schedule; with
    ``min_bytes`` a batch under one micro-tile with its rows' panels split over the cores."""
    rng = np.random.default_rng(batch)
    n, k, nr = 64, 256, 32
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = rng.random((batch, k), dtype=np.float32)
    for dot, target in _dots(kind):
        if kind == "int8":
            scale, zero = activation_qparams(0, 1)
            packed, bias = _t(np.zeros((2, k // 4, nr), np.int32)), _t(np.zeros((2, n), np.float32))
            _compile(quantize_pack_kernel(n, k, nr, scale, zero), target)(_t(w), _t(b), packed,
                                                                          bias)
            want = ref.dense_int8(x, w, b, "relu", scale, zero)
        else:
            scale, zero = 1.0, 0
            packed, bias = _t(np.zeros((2, k // 2, nr), np.int32)), _t(b)
            _compile(pack_lowp_kernel(n, k, nr, kind), target)(_t(w), packed)
            want = ref.dense(ref.round_to(x, kind), ref.round_to(w, kind), b, "relu")
        func = dense_lowp_kernel(n, k, "relu", 6, nr, True, batch, kind, dot, scale, zero,
                                 min_bytes)
        fn = _compile(work_rule.apply_default(func), target)
        y = _t(np.full((batch, n), np.nan, np.float32))
        fn(_t(x), packed, bias, y)
        np.testing.assert_allclose(y.numpy(), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_interaction_rounds_its_inputs(kind):
    rng = np.random.default_rng(3)
    t = rng.standard_normal((70, 5, 16)).astype(np.float32)
    fn = _compile(dot_interaction_kernel(5, 16, False, True, 16, True, None, kind), PORTABLE)
    out = _t(np.zeros((70, 16 + 10), np.float32))
    fn(_t(t), out)
    want = ref.dot_interaction(ref.round_to(t, kind), False, True)
    want[:, :16] = t[:, 0]                 # x itself passes through unrounded
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    assert np.abs(out.numpy() - ref.dot_interaction(t, False, True)).max() > 0   # it did round


@pytest.mark.parametrize("kind", ["bf16", "fp16", "int8"])
def test_lowp_kernels_vectorise_no_wider_than_a_tile(kind):
    """Each activation row is converted into words one 16-lane vector at a time: as one
    vector of the whole row (1,728 lanes at DLRM-v2's K=3456) LLVM took minutes a kernel."""
    import re
    script = dense_lowp_kernel(64, 3456, "relu", 6, 32, True, None, kind).script()
    widths = {int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", script)}
    assert widths and max(widths) <= 32, widths


def test_bad_kernel_configuration():
    with pytest.raises(ValueError, match="precision"):
        dense_lowp_kernel(4, 4, "relu", kind="fp8")
    with pytest.raises(ValueError, match="multiple of 16"):
        dense_lowp_kernel(4, 4, "relu", nr=8, kind="bf16", dot=True)


def test_compile_cli_numerics_errors(tmp_path):
    def run(*args):
        return subprocess.run(["dlrm-compile", "--preset", "tiny", "-o", str(tmp_path / "a"),
                               *args], capture_output=True, text=True, timeout=300)
    res = run("--mlp-quant", "int8")
    assert res.returncode == 2 and "--calibration-data" in res.stderr
    res = run("--precision", "fp8")
    assert res.returncode == 2 and "invalid choice" in res.stderr
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    res = run("--mlp-quant", "int8", "--calibration-data", str(bad))
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.strip()
    # Criteo data for a model of 4 tables (it was a torch.stack traceback in calibration)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "criteo.npz", X_int=rng.integers(0, 9, (2000, 13)),
             X_cat=rng.integers(0, 5, (2000, 26)), y=rng.integers(0, 2, 2000),
             counts=np.full(26, 5))
    res = run("--mlp-quant", "int8", "--calibration-data", str(tmp_path / "criteo.npz"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "the data holds Criteo's 13 dense and 26 categorical features; the model takes 13 " \
           "dense features and has 4 tables" in res.stderr, res.stderr
    assert not (tmp_path / "a").exists()
