"""Random tables drawn as they are written (``DLRM(lazy_tables=True)``, the compile's
``StreamedTable``): the same bytes as the model held in memory, in every quantisation, and a
stream that goes wrong leaves no artifact behind."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest
import torch

from dlrmc.artifact import ArtifactError, write_artifact
from dlrmc.compiler import cli as compile_cli
from dlrmc.compiler import lower as lower_mod
from dlrmc.compiler.build import compile_model
from dlrmc.compiler.lower import LoweringError, lower
from dlrmc.frontend.arch import Arch
from dlrmc.frontend.export import export_model
from dlrmc.frontend.model import DLRM, RandomTable
from dlrmc.runtime import load

from conftest import BARE_MANIFEST, make_batch

# Odd widths and row counts put tables at odd positions of the random stream (a float32 draw
# takes half a 64-bit output), and the dcn and learned-pooling weights are drawn after them.
ARCHS = {
    "dot-odd": Arch(3, (11, 7, 5), (6, 8, 3), (5, 1)),
    "dcn": Arch(5, (13, 9, 1, 6), (4, 5), (7, 1), interaction_op="dcn", dcn_layers=2,
                dcn_low_rank=3, output="logit"),
    "learned": Arch(4, (9, 3, 17), (2, 4), (6, 1), weighted_pooling="learned"),
    "mean-cat": Arch(2, (5, 8), (3, 2), (4, 1), pooling="mean", interaction_op="cat"),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("seed", [0, 7])
def test_random_tables_draw_the_models_own_values(name, seed):
    arch = ARCHS[name]
    eager, lazy = DLRM(arch, seed=seed), DLRM(arch, seed=seed, lazy_tables=True)
    rng = np.random.default_rng(seed)
    for key, value in eager.state_dict().items():
        if key not in lazy.table_sources:
            assert torch.equal(value, lazy.state_dict()[key]), key
            continue
        assert lazy.state_dict()[key].device.type == "meta"
        source, want = lazy.table_sources[key], value.numpy()
        cuts = sorted({0, source.rows, *rng.integers(0, source.rows + 1, 3).tolist()})
        got = np.concatenate([source.draw(lo, hi) for lo, hi in zip(cuts, cuts[1:])])
        np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("name, quant", [("dot-odd", None), ("dcn", "int8"), ("mean-cat", "int4")])
def test_a_lazy_compile_writes_the_eager_compiles_bytes(tmp_path, monkeypatch, name, quant):
    """Tiny pieces, so every table is drawn in several, ahead of the writer."""
    arch = ARCHS[name]
    monkeypatch.setattr(lower_mod, "STREAM_BYTES", 24)
    eager, lazy = DLRM(arch, seed=3).eval(), DLRM(arch, seed=3, lazy_tables=True).eval()
    for model, out in ((eager, "eager"), (lazy, "lazy")):
        compile_model(model, arch, None, str(tmp_path / out), log=lambda _: None, buckets=(),
                      emb_quant=quant)
    read = lambda d: (tmp_path / d / "weights.bin").read_bytes()   # noqa: E731
    assert read("lazy") == read("eager")
    compiled = load(str(tmp_path / "lazy"))
    dense, offsets, indices = make_batch(arch, 9, np.random.default_rng(1))
    with torch.no_grad():
        want = eager.probabilities(torch.from_numpy(dense), torch.from_numpy(offsets),
                                   [torch.from_numpy(i) for i in indices]).numpy()
    tol = 1e-5 if quant is None else 0.05
    np.testing.assert_allclose(compiled.predict(dense, offsets, indices), want, atol=tol)


def test_weights_with_no_values_are_refused_by_name():
    arch = ARCHS["dot-odd"]
    ep = export_model(DLRM(arch, lazy_tables=True).eval(), arch)
    with pytest.raises(LoweringError, match=r"no values \(meta tensors\): emb_l\.0\.weight, "
                                            r"emb_l\.1\.weight, emb_l\.2\.weight"):
        lower(ep, "llvm")


@dataclasses.dataclass
class ShortStream:
    shape: tuple = (4, 8)
    dtype: np.dtype = np.dtype(np.float32)

    def chunks(self):
        yield np.ones((3, 8), np.float32)


@dataclasses.dataclass
class FailingStream(ShortStream):
    def chunks(self):
        yield np.ones((2, 8), np.float32)
        raise MemoryError("drawing the next piece")


@pytest.mark.parametrize("stream, error", [
    (ShortStream(), r"weight t: 96 bytes were written, its shape \[4, 8\] and dtype float32 "
                    r"make 128"),
    (FailingStream(), "drawing the next piece")])
def test_a_stream_that_goes_wrong_leaves_the_old_artifact(tmp_path, stream, error):
    out = tmp_path / "art"
    library = lambda path, workspace: open(path, "wb").close()   # noqa: E731
    write_artifact(str(out), library, [("t", np.zeros((4, 8), np.float32))], BARE_MANIFEST)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises((ArtifactError, MemoryError), match=error):
        write_artifact(str(out), library, [("t", stream)], BARE_MANIFEST)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["art"]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_a_lazy_model_cut_to_a_batchs_rows_predicts_as_the_whole_model(name):
    """What --check and dlrm-bench compare with when the tables were never drawn: PyTorch on
    the rows the batch reads (empty bags and untouched tables included)."""
    arch = ARCHS[name]
    eager, lazy = DLRM(arch, seed=4).eval(), DLRM(arch, seed=4, lazy_tables=True).eval()
    rng = np.random.default_rng(0)
    for batch in (1, 5, 33):
        dense, offsets, indices = make_batch(arch, batch, rng, empty=0.5)
        small, renumbered = lazy.with_rows(indices)
        assert sum(small.arch.embedding_sizes) <= sum(max(1, len(i)) for i in indices)
        with torch.no_grad():
            got, want = (m.probabilities(torch.from_numpy(dense), torch.from_numpy(offsets),
                                         [torch.from_numpy(i) for i in idx]).numpy()
                         for m, idx in ((small, renumbered), (eager, indices)))
        np.testing.assert_array_equal(got, want)


def test_check_of_a_40m_row_table_draws_only_the_batchs_rows(tmp_path, monkeypatch):
    """--check on tables the compile never held (dlrm-v2's are 104.5 GB as float32): PyTorch
    gets the rows the batch reads, and no table is drawn whole."""
    arch = Arch(2, (40_000_000, 3), (13, 4, 2), (4, 1), interaction_op="dcn", dcn_layers=1,
                dcn_low_rank=2, output="logit")
    model = DLRM(arch, seed=0, lazy_tables=True).eval()
    compile_model(model, arch, None, str(tmp_path / "v2"), log=lambda _: None, buckets=(),
                  emb_quant="int4")
    taken = []
    monkeypatch.setattr(RandomTable, "draw", None)         # no slice of rows, let alone all
    real_take = RandomTable.take
    monkeypatch.setattr(RandomTable, "take", lambda self, rows: taken.append(len(rows)) or
                        real_take(self, rows))
    assert compile_cli.check_artifact(model, str(tmp_path / "v2"), 8) < 0.05
    assert len(taken) == 2 and max(taken) <= 16             # batch 8, bags of 2


def test_a_file_system_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    """dlrm-v2 in float32 is a 104.5 GB weights file: a disk without room for it is named
    before a byte is written, and the artifact already there stays."""
    from dlrmc.artifact import format as fmt

    out = tmp_path / "art"
    library = lambda path, workspace: open(path, "wb").close()   # noqa: E731
    write_artifact(str(out), library, [("t", np.zeros((4, 8), np.float32))], BARE_MANIFEST)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    real = os.statvfs(tmp_path)
    free = (fmt.SPACE_MARGIN + 100) // real.f_frsize      # room for 100 bytes of weights
    monkeypatch.setattr(fmt.os, "statvfs", lambda path: os.statvfs_result(
        (real.f_bsize, real.f_frsize, real.f_blocks, free, free, real.f_files, real.f_ffree,
         real.f_favail, real.f_flag, real.f_namemax)))
    with pytest.raises(ArtifactError, match=r"needs 0\.668 GB for its weights and library, and "
                                            + re.escape(str(tmp_path)) + r" has 0\.268 GB free"):
        write_artifact(str(out), library, [("t", ShortStream(shape=(10_000, 10_000)))],
                       BARE_MANIFEST, weight_bytes=10_000 * 10_000 * 4)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["art"]
