"""Compiled artifacts equal PyTorch eager across architectures, batch sizes and bag shapes."""

from __future__ import annotations

import numpy as np
import pytest

from dlrmc.artifact import ArtifactError
from dlrmc.frontend.arch import Arch

from conftest import host_runs, make_batch, torch_predict

# Generated configurations: 1-30 tables, widths not multiples of 16, every interaction,
# pooling mode and weighted pooling. Each compiles once and serves every batch below.
CONFIGS = [
    Arch(16, (100, 3, 50, 7), (13, 32, 16), (24, 1)),
    Arch(5, (9,), (3, 5), (1,), interaction_op="dot"),
    Arch(7, tuple(range(2, 32)), (13, 9, 7), (16, 8, 1)),                      # 30 tables
    Arch(12, (40, 30, 20), (4, 12), (10, 1), interaction_itself=True),
    Arch(3, (11, 5, 8, 2, 6), (2, 6, 3), (7, 1), interaction_op="cat"),
    Arch(8, (50, 60), (5, 8), (4, 1), weighted_pooling="learned"),
    Arch(6, (20, 10, 30), (7, 6), (3, 1), pooling="mean"),
    Arch(10, (20, 10, 30, 4), (3, 10), (6, 1), pooling="max", interaction_itself=True),
    Arch(33, (1000, 17), (13, 64, 33), (32, 16, 1), interaction_op="cat", pooling="mean"),
]
BATCHES = (1, 2, 4, 13, 16, 37, 256, 1000)   # with conftest.BUCKETS: every entry path


@pytest.mark.parametrize("arch", CONFIGS, ids=lambda a: f"T{a.num_tables}d{a.sparse_feature_size}"
                         f"-{a.interaction_op}{'I' if a.interaction_itself else ''}-{a.pooling}"
                         f"{'-w' if a.weighted_pooling else ''}")
def test_matches_pytorch_over_batches(compiled, arch):
    c = compiled(arch)
    rng = np.random.default_rng(arch.num_tables)
    for batch in BATCHES:
        for max_bag in (1, 50) if batch <= 256 else (4,):
            dense, offsets, indices = make_batch(arch, batch, rng, max_bag=max_bag)
            ours = c.runtime.predict(dense, offsets, indices)
            ref = torch_predict(c.model, dense, offsets, indices)
            assert ours.shape == (batch, 1)
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6,
                                       err_msg=f"batch {batch}, bags up to {max_bag}")


def test_all_bags_empty_and_2d_index_layout(compiled):
    arch = CONFIGS[0]
    c = compiled(arch)
    batch = 9
    dense = np.random.default_rng(0).standard_normal((batch, arch.num_dense)).astype(np.float32)
    offsets = np.zeros((arch.num_tables, batch), np.int64)
    empty = [np.zeros(0, np.int64) for _ in range(arch.num_tables)]
    np.testing.assert_allclose(c.runtime.predict(dense, offsets, empty),
                               torch_predict(c.model, dense, offsets, empty), rtol=1e-5, atol=2e-6)
    # The reference's [T, N] tensor layout: the same bag size everywhere.
    rng = np.random.default_rng(1)
    idx2d = np.stack([rng.integers(0, n, batch * 2) for n in arch.embedding_sizes])
    offsets = np.tile(np.arange(0, 2 * batch, 2), (arch.num_tables, 1))
    np.testing.assert_allclose(c.runtime.predict(dense, offsets, idx2d),
                               torch_predict(c.model, dense, offsets, list(idx2d)),
                               rtol=1e-5, atol=2e-6)


def test_int32_inputs_accepted(compiled):
    arch = CONFIGS[0]
    c = compiled(arch)
    dense, offsets, indices = make_batch(arch, 17, np.random.default_rng(3), index_dtype=np.int32)
    np.testing.assert_allclose(
        c.runtime.predict(dense, offsets, indices),
        torch_predict(c.model, dense, offsets.astype(np.int64), [i.astype(np.int64) for i in indices]),
        rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("target", ["llvm -mcpu=haswell", "llvm -mcpu=skylake-avx512 -num-cores=2",
                                    "llvm -mcpu=x86-64"])
def test_each_x86_vector_width_matches_pytorch(tmp_path, target):
    from dlrmc.compiler.build import compile_model
    from dlrmc.frontend.model import DLRM
    from dlrmc.runtime import load

    arch = Arch(24, (50, 40, 30), (13, 70, 24), (33, 1))
    model = DLRM(arch, seed=4).eval()
    compile_model(model, arch, target, str(tmp_path / "a"), log=lambda _: None, buckets=(8,))
    if not host_runs(target):       # compiled for any CPU, run only on one that has it
        with pytest.raises(ArtifactError, match="needs CPU features this CPU lacks"):
            load(str(tmp_path / "a"))
        return
    runtime = load(str(tmp_path / "a"))
    rng = np.random.default_rng(5)
    for batch in (1, 7, 300):
        dense, offsets, indices = make_batch(arch, batch, rng, max_bag=6)
        np.testing.assert_allclose(runtime.predict(dense, offsets, indices),
                                   torch_predict(model, dense, offsets, indices),
                                   rtol=1e-5, atol=2e-6)
