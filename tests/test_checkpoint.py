"""Reference-format checkpoints: safe loading, architecture inference, clear rejections."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from dlrmc.frontend.arch import Arch
from dlrmc.frontend.checkpoint import CheckpointError, infer_arch, load_model, read_checkpoint
from dlrmc.frontend.model import DLRM


class ReferenceLayoutNet(nn.Module):
    """Written from the reference's description, independently of dlrmc's DLRM: the module
    structure that facebookresearch/dlrm's DLRM_Net saves (emb_l ModuleList of EmbeddingBag,
    bot_l/top_l Sequential of Linear + activation)."""

    def __init__(self, m, ln_emb, ln_bot, ln_top, itself=False, op="dot"):
        super().__init__()
        self.op, self.itself = op, itself
        self.emb_l = nn.ModuleList(nn.EmbeddingBag(n, m, mode="sum", sparse=True) for n in ln_emb)
        self.bot_l = self._mlp(ln_bot, sigmoid_at=-1)
        self.top_l = self._mlp(ln_top, sigmoid_at=len(ln_top) - 2)

    @staticmethod
    def _mlp(ln, sigmoid_at):
        layers = []
        for i in range(len(ln) - 1):
            layers += [nn.Linear(ln[i], ln[i + 1]), nn.Sigmoid() if i == sigmoid_at else nn.ReLU()]
        return nn.Sequential(*layers)

    def forward(self, dense_x, lS_o, lS_i):
        x = self.bot_l(dense_x)
        ly = [e(lS_i[k], lS_o[k]) for k, e in enumerate(self.emb_l)]
        if self.op == "cat":
            return self.top_l(torch.cat([x] + ly, 1))
        feats = torch.stack([x] + ly, 1)
        z = feats @ feats.transpose(1, 2)
        rows, cols = torch.tril_indices(len(ly) + 1, len(ly) + 1, 0 if self.itself else -1)
        return self.top_l(torch.cat([x, z[:, rows, cols]], 1))


def _save_reference(net, path):
    torch.save({"epoch": 3, "nepochs": 5, "nbatches": 100, "nbatches_test": 10, "iter": 42,
                "state_dict": net.state_dict(), "train_acc": np.float64(0.78),
                "train_loss": np.float32(0.46), "test_acc": np.float64(0.77),
                "test_loss": np.float64(0.47), "total_loss": np.float32(1.5),
                "total_accu": np.int64(7), "opt_state_dict": {
                    "state": {}, "param_groups": [{"lr": 0.1, "momentum": 0, "params": [0, 1]}]}},
               path)


@pytest.mark.parametrize("op,itself", [("dot", False), ("dot", True), ("cat", False)])
def test_reference_checkpoint_loads_and_predicts_the_same(tmp_path, op, itself):
    ln_emb, m = (13, 7, 29), 4
    nf = len(ln_emb) + 1
    width = (nf * (nf + 1) // 2 if itself else nf * (nf - 1) // 2) + m if op == "dot" else nf * m
    net = ReferenceLayoutNet(m, ln_emb, (5, 9, m), (width, 6, 1), itself, op).eval()
    path = tmp_path / "ckpt.pt"
    _save_reference(net, path)
    model = load_model(path)
    assert model.arch == Arch(m, ln_emb, (5, 9, m), (6, 1), interaction_op=op,
                              interaction_itself=itself)
    rng = np.random.default_rng(0)
    dense = torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32))
    offsets = torch.tensor([[0, 1, 1, 3, 4, 4]] * 3)
    indices = [torch.from_numpy(rng.integers(0, n, 6)) for n in ln_emb]
    with torch.no_grad():
        torch.testing.assert_close(model(dense, offsets, indices), net(dense, offsets, indices))


@pytest.mark.parametrize("wrap", ["ddp", "compiled", "ddp_mlps"])
def test_a_wrapped_models_checkpoint_loads_as_the_model(tmp_path, wrap):
    """What wrappers add to the keys: DistributedDataParallel's "module.", a torch.compile'd
    module's "_orig_mod." (both taken from the real wrappers' state dicts), and the reference's
    distributed run, which wraps its two MLPs in DDP ("bot_l.module.0.weight")."""
    net = ReferenceLayoutNet(4, (13, 7, 29), (5, 9, 4), (10, 6, 1)).eval()
    if wrap == "ddp":
        sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    elif wrap == "compiled":
        sd = torch.compile(net).state_dict()
        assert all(k.startswith("_orig_mod.") for k in sd)
    else:
        sd = {k.replace("bot_l.", "bot_l.module.").replace("top_l.", "top_l.module."): v
              for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "w.pt")
    model = load_model(tmp_path / "w.pt")
    rng = np.random.default_rng(1)
    dense = torch.from_numpy(rng.standard_normal((5, 5)).astype(np.float32))
    offsets = torch.tensor([[0, 1, 2, 2, 4]] * 3)
    indices = [torch.from_numpy(rng.integers(0, n, 5)) for n in (13, 7, 29)]
    with torch.no_grad():
        torch.testing.assert_close(model(dense, offsets, indices), net(dense, offsets, indices))


class _MixedDimBag(nn.Module):
    """The reference's mixed-dimension table (--md-flag): a narrow bag, projected after
    pooling to the common width (no projection where the table is already that wide)."""

    def __init__(self, n, dim, base):
        super().__init__()
        self.embs = nn.EmbeddingBag(n, dim, mode="sum")
        self.proj = nn.Linear(dim, base, bias=False) if dim < base else nn.Identity()

    def forward(self, indices, offsets):
        return self.proj(self.embs(indices, offsets))


def test_mixed_dimension_tables_load_as_their_projections(tmp_path):
    ln_emb, dims = (13, 7, 29), (2, 8, 3)
    net = ReferenceLayoutNet(8, ln_emb, (5, 9, 8), (14, 6, 1)).eval()
    net.emb_l = nn.ModuleList(_MixedDimBag(n, d, 8) for n, d in zip(ln_emb, dims))
    _save_reference(net, tmp_path / "md.pt")
    model = load_model(tmp_path / "md.pt")
    assert model.arch.embedding_sizes == ln_emb and model.arch.sparse_feature_size == 8
    rng = np.random.default_rng(2)
    dense = torch.from_numpy(rng.standard_normal((6, 5)).astype(np.float32))
    offsets = torch.tensor([[0, 1, 1, 3, 6, 6]] * 3)              # bags of 0 to 3 indices
    indices = [torch.from_numpy(rng.integers(0, n, 8)) for n in ln_emb]
    with torch.no_grad():
        torch.testing.assert_close(model(dense, offsets, indices), net(dense, offsets, indices))
    sd = {k: v for k, v in net.state_dict().items()}
    sd["emb_l.0.weight_q"], sd["emb_l.0.weight_r"] = sd.pop("emb_l.0.embs.weight"), torch.zeros(4, 8)
    torch.save(sd, tmp_path / "qr.pt")
    with pytest.raises(CheckpointError, match="emb_l.0: quotient-remainder embeddings .*--qr-flag"):
        load_model(tmp_path / "qr.pt")


def test_bare_state_dict_and_round_trip(tmp_path):
    arch = Arch(8, (10, 20), (3, 8), (4, 1), weighted_pooling="learned")
    src = DLRM(arch, seed=5)
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt")
    assert loaded.arch == arch
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_ambiguous_interaction_needs_the_flag(tmp_path):
    # 1 table, bottom output 2: dot-itself gives 3 + 2 = 5 and cat gives 2 * 2 = 4; with
    # bottom output 3 and 2 tables, dot-itself gives 6 + 3 = 9 and cat gives 3 * 3 = 9.
    net = ReferenceLayoutNet(3, (5, 6), (4, 3), (9, 1), itself=True)
    torch.save(net.state_dict(), tmp_path / "a.pt")
    sd = read_checkpoint(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="several interactions.*--arch-interaction-op"):
        infer_arch(sd)
    assert infer_arch(sd, {"interaction_op": "cat"}).interaction_op == "cat"
    arch = infer_arch(sd, {"interaction_op": "dot", "interaction_itself": True})
    assert arch.interaction_itself


def test_mismatches_are_named(tmp_path):
    net = ReferenceLayoutNet(4, (10, 20), (3, 4), (10, 1))
    sd = net.state_dict()
    bad_shape = dict(sd, **{"emb_l.1.weight": torch.zeros(20, 5)})
    with pytest.raises(CheckpointError, match="emb_l"):
        infer_arch(bad_shape)
    extra = dict(sd, **{"emb_l.0.extra": torch.zeros(3, 4)})
    with pytest.raises(CheckpointError, match="unexpected key emb_l.0.extra"):
        infer_arch(extra)
    no_top = {k: v for k, v in sd.items() if not k.startswith("top_l")}
    with pytest.raises(CheckpointError, match="top_l"):
        infer_arch(no_top)
    wrong_top = dict(sd, **{"top_l.0.weight": torch.zeros(1, 11)})
    with pytest.raises(CheckpointError, match="11 inputs"):
        infer_arch(wrong_top)
    with pytest.raises(CheckpointError, match="--arch-sparse-feature-size is 8 but the checkpoint has 4"):
        infer_arch(sd, {"sparse_feature_size": 8})
    with pytest.raises(CheckpointError, match="--arch-embedding-size is 10-21 but the checkpoint has 10-20"):
        infer_arch(sd, {"embedding_sizes": (10, 21)})


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/dlrmc-pwned", "w"))


def test_unsafe_and_corrupt_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"emb_l.0.weight": torch.zeros(2, 2)}, "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* safely: it pickles "
                       "io.open, which a checkpoint of weights does not need"):
        read_checkpoint(evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        read_checkpoint(raw)
    junk = tmp_path / "junk.pt"
    for content in (b"not a checkpoint at all", b"x", b""):   # (torch said "KeyError: '101'")
        junk.write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot load checkpoint .*junk.pt': it is "
                           "neither a zip archive nor a pickle"):
            read_checkpoint(junk)
    legacy = tmp_path / "legacy.pt"      # torch.save's pre-1.6 format: a pickle, still read
    torch.save({"emb_l.0.weight": torch.ones(2, 2)}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy)["emb_l.0.weight"].sum() == 4
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"epoch": 1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="state_dict"):
        read_checkpoint(tmp_path / "nostate.pt")
    # what else torch writes as a .pt zip: said, not torch's advice to load it unsafely
    layer = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(layer), tmp_path / "scripted.pt")
    torch.export.save(torch.export.export(layer, (torch.ones(1, 3),)), tmp_path / "exported.pt2")
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                            + b"\0" * 4)     # safetensors' own layout
    np.savez(tmp_path / "arrays.npz", w=np.zeros(2))
    torch.onnx.export(layer, (torch.ones(1, 3),), tmp_path / "m.onnx", dynamo=False)
    for name, what in (("scripted.pt", "a TorchScript archive"),
                       ("exported.pt2", "a torch.export archive"),
                       ("m.safetensors", "a safetensors file"),
                       ("arrays.npz", "a numpy .npz archive")):
        with pytest.raises(CheckpointError, match=f"{name}' is {what}.* save the model's "
                           r"state_dict\(\) with torch.save"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="m.onnx' is an ONNX model, not a checkpoint: "
                       "compile it with --onnx"):
        read_checkpoint(tmp_path / "m.onnx")
