"""Checkpoints written as directories by distributed training (torch.distributed.checkpoint
and torchsnapshot), each written by the library itself from a TorchRec
DistributedModelParallel model sharded over two gloo ranks; TorchRec the oracle of what the
model computes. A tampered directory is a
CheckpointError naming the problem, and its pickle never runs code."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch

torchrec = pytest.importorskip("torchrec")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from dlrmc.compiler.build import compile_model  # noqa: E402
from dlrmc.frontend.checkpoint import CheckpointError, load_model, read_checkpoint  # noqa: E402
from dlrmc.runtime import load  # noqa: E402

from conftest import run  # noqa: E402
from test_torchrec import _kjt_batch, _torchrec_model  # noqa: E402

WRITER = os.path.join(os.path.dirname(__file__), "fixtures", "write_dist_checkpoint.py")
ROWS = (40, 7, 90, 3)           # the writer's tables
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t{}.weight"
NEEDS_SNAPSHOT = pytest.mark.skipif(importlib.util.find_spec("torchsnapshot") is None,
                                    reason="torchsnapshot is not installed (.ci/run installs it)")
KINDS = ["dcp", pytest.param("snapshot", marks=NEEDS_SNAPSHOT)]


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    """kind -> (directory, reference state dict): the same DLRM_DCN saved by two ranks."""
    out = {}
    for kind in ("dcp", "snapshot"):
        if kind == "snapshot" and importlib.util.find_spec("torchsnapshot") is None:
            continue
        root = tmp_path_factory.mktemp(kind)
        run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", WRITER, kind, root / "ckpt", root / "reference.pt", timeout=300)
        out[kind] = (root / "ckpt", torch.load(root / "reference.pt", weights_only=True))
    return out


def _torchrec_logits(sd, dense, values, lengths):
    """TorchRec's DLRM_DCN holding ``sd`` (the writer's, or ``_single_rank_checkpoint``'s)."""
    dim = sd[TABLE.format(0)].shape[1]
    model = _torchrec_model(ROWS, dim, 5, [16, dim], [32, 16, 1], seed=0, dcn=(2, 4))
    model.load_state_dict(sd)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{k}" for k in range(len(ROWS))],
                                              values=torch.from_numpy(values),
                                              lengths=torch.from_numpy(lengths))
    with torch.no_grad():
        return model(torch.from_numpy(dense), kjt).numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_a_two_rank_checkpoint_with_sharded_tables_runs_as_torchrec_does(
        two_rank_checkpoints, kind, tmp_path):
    path, reference = two_rank_checkpoints[kind]
    sd = read_checkpoint(path)
    assert set(sd) == set(reference)
    assert [k for k in sd if "embedding_bags" in k] == [TABLE.format(t) for t in range(4)]
    if kind == "dcp":   # DCP lists the tensors in the order the ranks wrote them: not the model's
        assert list(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata) != \
            list(sd)
    for k, v in reference.items():
        assert torch.equal(sd[k], v), k
    ours = load_model(path)
    assert (ours.arch.embedding_sizes, ours.arch.interaction_op) == (ROWS, "dcn")
    if kind == "dcp":   # each rank's torch.save of the same state dict: its own shards only
        with pytest.raises(CheckpointError, match="holds ShardedTensors, a "
                           "DistributedModelParallel state dict .* torch.distributed.checkpoint"):
            load_model(f"{path}-rank0.pt")
        # one file in DMP's own order (the dense parts, then the tables) is a model's
        torch.save({k: reference[k] for k in sd}, tmp_path / "dmp_order.pt")
        assert load_model(tmp_path / "dmp_order.pt").arch.embedding_sizes == ROWS
        # DCP's own conversion to one file writes DCP's order: the tables interleaved
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(str(path), str(tmp_path / "converted.pt"))
        with pytest.raises(CheckpointError, match="comes between the tables, so .* pass the "
                           "checkpoint directory itself"):
            load_model(tmp_path / "converted.pt")
    compile_model(ours, ours.arch, None, str(tmp_path / "a"), log=lambda _: None, buckets=(8,))
    compiled = load(str(tmp_path / "a"))
    for batch in (3, 8):
        dense, values, lengths = _kjt_batch(ROWS, batch, 5, seed=batch)
        np.testing.assert_allclose(compiled.predict_kjt(dense, values, lengths, logits=True),
                                   _torchrec_logits(reference, dense, values, lengths),
                                   rtol=1e-5, atol=1e-5)


def _single_rank_checkpoint(kind: str, path, chunk_bytes: int = 0):
    model = _torchrec_model(ROWS, 8, 5, [16, 8], [32, 16, 1], seed=0, dcn=(2, 4))
    if kind == "dcp":
        dcp.save(model.state_dict(), checkpoint_id=str(path), no_dist=True)
    else:
        from torchsnapshot import Snapshot
        os.environ["TORCHSNAPSHOT_MAX_CHUNK_SIZE_BYTES_OVERRIDE"] = str(chunk_bytes or 2 ** 30)
        try:
            Snapshot.take(path=str(path), app_state={"model": model})
        finally:
            del os.environ["TORCHSNAPSHOT_MAX_CHUNK_SIZE_BYTES_OVERRIDE"]
    return model.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_dlrm_compile_takes_a_checkpoint_directory(kind, tmp_path):
    """One process's checkpoint through the command line; torchsnapshot's tables in chunks
    (what it does to a tensor above its chunk size, 512 MB by default)."""
    reference = _single_rank_checkpoint(kind, tmp_path / "ckpt", chunk_bytes=256)
    if kind == "snapshot":
        meta = json.loads((tmp_path / "ckpt" / ".snapshot_metadata").read_text())
        assert any(e["type"] == "ChunkedTensor" for e in meta["manifest"].values())
    res = run("dlrm-compile", "--load-model", tmp_path / "ckpt", "-o", tmp_path / "m.dlrmc",
              "--check", "9", "--buckets", "none", "--no-progress")
    diff = float(res.stdout.split("max |dlrmc - PyTorch| over batch 9:")[1].split()[0])
    assert diff < 1e-6, res.stdout
    dense, values, lengths = _kjt_batch(ROWS, 6, 5, seed=1)
    np.testing.assert_allclose(
        load(str(tmp_path / "m.dlrmc")).predict_kjt(dense, values, lengths, logits=True),
        _torchrec_logits(reference, dense, values, lengths), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_a_dcp_training_checkpoint_gives_its_model(layout, tmp_path):
    """A training job saves more than the model: its optimizer's state and step beside it,
    the model under "model" ({"model": ..., "optimizer": ...}) or at the top level."""
    model = _torchrec_model(ROWS, 8, 5, [16, 8], [32, 16, 1], seed=0, dcn=(2, 4))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    dense, values, lengths = _kjt_batch(ROWS, 4, 5, seed=0)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{k}" for k in range(len(ROWS))],
                                              values=torch.from_numpy(values),
                                              lengths=torch.from_numpy(lengths))
    model(torch.from_numpy(dense), kjt).sum().backward()
    opt.step()
    sd = model.state_dict()
    state = ({"model": sd, "optimizer": opt.state_dict(), "step": 1} if layout == "nested"
             else {**sd, "optimizer": opt.state_dict(), "step": 1})
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    got = read_checkpoint(tmp_path / "ckpt")
    assert list(got) == list(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assert load_model(tmp_path / "ckpt").arch.embedding_sizes == ROWS


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_larger_than_memory_is_assembled_on_disk(kind, tmp_path, monkeypatch):
    """What would take more than half the available memory is assembled in mapped files of
    the temporary directory instead, and the model compiles from them; with no room there
    either, the error names both."""
    from dlrmc.frontend import dist_checkpoint
    reference = _single_rank_checkpoint(kind, tmp_path / "ckpt", chunk_bytes=256)
    if kind == "snapshot":       # what is assembled (its chunked tables), not mapped
        assembled = sum(4 * math.prod(e["shape"]) for e in json.loads(
            (tmp_path / "ckpt" / ".snapshot_metadata").read_text())["manifest"].values()
            if e["type"] == "ChunkedTensor")
    else:
        assembled = sum(4 * math.prod(m.size) for m in dcp.FileSystemReader(
            str(tmp_path / "ckpt")).read_metadata().state_dict_metadata.values())
    monkeypatch.setattr(dist_checkpoint, "SMALL_TENSOR", 0)
    on_disk = []
    fallocate = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, o, n: (on_disk.append(n),
                                                                 fallocate(fd, o, n)))
    monkeypatch.setattr(dist_checkpoint, "available_memory", lambda: 2 * assembled)
    read_checkpoint(tmp_path / "ckpt")
    assert on_disk == []                                 # half the memory: held in it
    monkeypatch.setattr(dist_checkpoint, "available_memory", lambda: 2 * assembled - 1)
    sd = read_checkpoint(tmp_path / "ckpt")
    assert sum(on_disk) == assembled
    assert all(torch.equal(sd[k], v) for k, v in reference.items())
    ours = load_model(tmp_path / "ckpt")
    compile_model(ours, ours.arch, None, str(tmp_path / "a"), log=lambda _: None, buckets=(4,))
    dense, values, lengths = _kjt_batch(ROWS, 4, 5, seed=7)
    np.testing.assert_allclose(
        load(str(tmp_path / "a")).predict_kjt(dense, values, lengths, logits=True),
        _torchrec_logits(reference, dense, values, lengths), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(dist_checkpoint.shutil, "disk_usage",
                        lambda _: types.SimpleNamespace(free=assembled - 1))
    with pytest.raises(CheckpointError, match=r"assembling its tensors takes 0.0 GB; this "
                       r"machine has 0.0 GB of memory available and 0.0 GB free in .* \(TMPDIR\)"):
        read_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(dist_checkpoint.shutil, "disk_usage",
                        lambda _: types.SimpleNamespace(free=assembled))

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CheckpointError, match=r"no room for 0.0 GB more in .* No space left"):
        read_checkpoint(tmp_path / "ckpt")


class _RunsCode:
    """What a malicious pickle builds: a call of os.system on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_dcp_directory_is_refused_by_name(tmp_path):
    good = tmp_path / "good"
    _single_rank_checkpoint("dcp", good)
    md = dcp.FileSystemReader(str(good)).read_metadata()

    def tampered(name, edit=None, metadata=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit:
            edit(d)
        if metadata is not None:
            (d / ".metadata").write_bytes(pickle.dumps(metadata))
        return d

    marker = tmp_path / "ran"
    index, info = next(iter(md.storage_data.items()))
    outside = dict(md.storage_data)
    outside[index] = type(info)("../good/__0_0.distcp", info.offset, info.length)
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    table = "sparse_arch.embedding_bag_collection.embedding_bags.t2.weight"

    def resized(size, chunks):
        tensors = dict(md.state_dict_metadata)
        tensors[table] = TensorStorageMetadata(
            tensors[table].properties, torch.Size(size),
            [ChunkStorageMetadata(torch.Size(o), torch.Size(z)) for o, z in chunks])
        return type(md)(tensors, md.planner_data, md.storage_data)

    cases = {
        "huge": (tampered("huge", metadata=resized([10 ** 12, 8], [([0, 0], [10 ** 12, 8])])),
                 "its tensors would take 320000000"),   # 32 TB and the rest
        "hole": (tampered("hole", metadata=resized([90, 8], [([0, 0], [80, 8])])),
                 f"({table}): its pieces do not cover [90, 8]"),
        "overlap": (tampered("overlap", metadata=resized([90, 8], [([0, 0], [90, 8]),
                                                                   ([10, 0], [5, 8])])),
                    "pieces at [0, 0] and [10, 0] overlap"),
        "code": (tampered("code", metadata=[md, _RunsCode(marker)]),
                 "refers to posix.system, which checkpoint metadata does not hold"),
        "odd planner data": (tampered("planner", metadata=type(md)(
            md.state_dict_metadata, [1, 2], md.storage_data)), None),
        "not metadata": (tampered("list", metadata=[1, 2]),
                         "is not torch.distributed.checkpoint metadata"),
        "garbage": (tampered("garbage", lambda d: (d / ".metadata").write_bytes(b"\x80\x05x")),
                    "cannot read"),
        "outside": (tampered("outside", metadata=type(md)(md.state_dict_metadata, None,
                                                          outside)),
                    "file '../good/__0_0.distcp' is not a path inside"),
        "truncated": (tampered("short", lambda d: os.truncate(d / "__0_0.distcp", 100)),
                      "has 100 bytes, the metadata needs"),
        "missing": (tampered("missing", lambda d: os.remove(d / "__0_0.distcp")),
                    "file '__0_0.distcp' is missing"),
        "link out": (tampered("link", lambda d: (os.remove(d / "__0_0.distcp"), os.symlink(
            good / "__0_0.distcp", d / "__0_0.distcp"))), "file '__0_0.distcp' is a link out of"),
        "plain directory": (tmp_path, "neither .metadata (torch.distributed.checkpoint) nor "
                                      ".snapshot_metadata (torchsnapshot)"),
    }
    for name, (path, message) in cases.items():
        if message is None:         # ignored: the metadata's own listing gives the order
            assert load_model(path).arch.embedding_sizes == ROWS
            continue
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_model(path)
    assert not marker.exists()
    res = run("dlrm-compile", "--load-model", cases["code"][0], "-o", tmp_path / "x.dlrmc",
              check=False)
    assert res.returncode == 2 and "posix.system" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "x.dlrmc").exists()


@NEEDS_SNAPSHOT
def test_a_tampered_snapshot_is_refused_by_name(tmp_path):
    good = tmp_path / "good"
    _single_rank_checkpoint("snapshot", good, chunk_bytes=256)
    meta = json.loads((good / ".snapshot_metadata").read_text())
    table = "0/model/sparse_arch.embedding_bag_collection.embedding_bags.t2.weight"
    bias = "0/model/dense_arch.model._mlp.0._linear.bias"
    assert meta["manifest"][table]["type"] == "ChunkedTensor"

    def tampered(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        m = json.loads(json.dumps(meta))
        edit(m["manifest"])
        (d / ".snapshot_metadata").write_text(json.dumps(m))
        return d

    def chunks(m):
        return m[table]["chunks"]

    # A tensor at an offset no array would start at (a byte before it) reads as written.
    entry = meta["manifest"][bias]
    with open(good / entry["location"], "rb") as f:
        f.seek(entry["byte_range"][0])
        data = f.read(entry["byte_range"][1] - entry["byte_range"][0])
    (good / "odd").write_bytes(b"\0" * 3 + data)

    def odd(m):
        m[bias].update(location="odd", byte_range=[3, 3 + len(data)])

    np.testing.assert_array_equal(read_checkpoint(tampered("odd", odd))[bias.split("/")[-1]],
                                  read_checkpoint(good)[bias.split("/")[-1]])
    cases = {
        "outside": (lambda m: m[bias].update(location="../../etc/hostname"),
                    "file '../../etc/hostname' is not a path inside"),
        "absolute": (lambda m: m[bias].update(location="/etc/hostname"), "is not a path inside"),
        "past the end": (lambda m: m[bias].update(byte_range=[0, 10 ** 9]),
                         "the metadata needs 1000000000"),
        "wrong size": (lambda m: m[bias].update(shape=[17]),
                       r"64 bytes hold no torch.float32 \[17\]"),
        "dtype": (lambda m: m[bias].update(dtype="torch.qint8"), "'torch.qint8' is not supported"),
        "overlap": (lambda m: chunks(m)[1].update(offsets=[0, 0]), "overlap"),
        "hole": (lambda m: chunks(m).pop(), "do not cover"),
        "outside shape": (lambda m: chunks(m)[0].update(offsets=[89, 0]), "is outside"),
        "serializer": (lambda m: m[bias].update(serializer="pickle"),
                       "serializer 'pickle' is not supported"),
        "not a rank": (lambda m: m.update({"x/model/y": {"type": "Tensor"}}),
                       "is not '<rank>/<path>'"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_model(tampered(name, edit))
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / ".snapshot_metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(broken)
