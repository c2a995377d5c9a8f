"""TorchRec's DLRM: its checkpoints compiled and run through every input layout, TorchRec
itself the oracle (installed by .ci/run; these tests skip where it is not)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

torchrec = pytest.importorskip("torchrec")

from torchrec.models.dlrm import DLRM as TorchRecDLRM, DLRM_DCN, DLRM_Projection  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from dlrmc.compiler.build import compile_model  # noqa: E402
from dlrmc.frontend.checkpoint import CheckpointError, load_model  # noqa: E402
from dlrmc.frontend.ops import reference_layout  # noqa: E402
from dlrmc.runtime import InputError, load  # noqa: E402

from conftest import run  # noqa: E402


def _collection(rows, dim, pooling=PoolingType.SUM) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{k}", embedding_dim=dim, num_embeddings=n,
                           feature_names=[f"f{k}"], pooling=pooling)
        for k, n in enumerate(rows)])


def _torchrec_model(rows, dim, dense_in, dense_layers, over_layers, seed,
                    pooling=PoolingType.SUM, dcn=None):
    """TorchRec's DLRM; with ``dcn`` = (layers, low rank) its DLRM_DCN (biases made
    non-zero, so they count); with ``dcn`` = ("projection", branch1, branch2) its
    DLRM_Projection."""
    torch.manual_seed(seed)
    args = dict(embedding_bag_collection=_collection(rows, dim, pooling),
                dense_in_features=dense_in, dense_arch_layer_sizes=dense_layers,
                over_arch_layer_sizes=over_layers)
    if dcn is None:
        return TorchRecDLRM(**args).eval()
    if dcn[0] == "projection":
        return DLRM_Projection(**args, interaction_branch1_layer_sizes=list(dcn[1]),
                               interaction_branch2_layer_sizes=list(dcn[2])).eval()
    model = DLRM_DCN(**args, dcn_num_layers=dcn[0], dcn_low_rank_dim=dcn[1]).eval()
    with torch.no_grad():
        for bias in model.inter_arch.crossnet.bias:
            bias.normal_()
    return model


def _kjt_batch(rows, batch, dense_in, seed, max_bag=5):
    """Multi-hot bags of 0..max_bag indices (empty ones included), KeyedJaggedTensor layout."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_bag + 1, len(rows) * batch)
    values = np.concatenate([rng.integers(0, n, int(lengths[t * batch:(t + 1) * batch].sum()))
                             for t, n in enumerate(rows)])
    dense = rng.random((batch, dense_in), dtype=np.float32)
    return dense, values, lengths


CONFIGS = [   # rows, dim, dense input, dense arch, over arch, pooling, DCN (layers, rank)
    ((40, 7, 90, 3), 8, 5, [16, 8], [32, 16, 1], PoolingType.SUM, None),
    ((11, 200, 60), 16, 13, [64, 32, 16], [64, 1], PoolingType.SUM, None),
    ((25,), 4, 3, [4], [8, 8, 1], PoolingType.SUM, None),
    ((30, 20, 10, 5, 9), 8, 6, [8], [16, 1], PoolingType.MEAN, None),
    ((40, 7, 90, 3), 8, 5, [16, 8], [32, 16, 1], PoolingType.SUM, (3, 4)),
    ((11, 200, 60), 16, 13, [32, 16], [64, 1], PoolingType.SUM, (1, 64)),
    ((30, 20, 10, 5, 9), 8, 6, [8], [16, 1], PoolingType.MEAN, (2, 1)),
    ((40, 7, 90, 3), 8, 5, [16, 8], [32, 16, 1], PoolingType.SUM, ("projection", [32, 16],
                                                                   [24])),
    ((11, 200), 4, 3, [4], [8, 1], PoolingType.MEAN, ("projection", [8], [16, 12])),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{len(c[0])}t-d{c[1]}-{c[5].name}"
                         + (("-projection" if c[6][0] == "projection" else
                             f"-dcn{c[6][0]}x{c[6][1]}") if c[6] else ""))
def test_a_torchrec_checkpoint_runs_as_torchrec_does(config, tmp_path):
    rows, dim, dense_in, dense_layers, over_layers, pooling, dcn = config
    model = _torchrec_model(rows, dim, dense_in, dense_layers, over_layers, seed=len(rows),
                            pooling=pooling, dcn=dcn)
    torch.save(model.state_dict(), tmp_path / "torchrec.pt")
    given = {"pooling": "mean"} if pooling == PoolingType.MEAN else None
    ours = load_model(tmp_path / "torchrec.pt", given)
    assert ours.arch.output == "logit"
    if dcn and dcn[0] == "projection":
        assert ours.arch.interaction_op == "projection"
        assert (ours.arch.proj_branch1, ours.arch.proj_branch2) == (tuple(dcn[1]), tuple(dcn[2]))
    else:
        assert ours.arch.interaction_op == ("dcn" if dcn else "dot")
        assert (ours.arch.dcn_layers, ours.arch.dcn_low_rank) == (dcn or (0, 0))
    compile_model(ours, ours.arch, None, str(tmp_path / "a"), log=lambda _: None, buckets=(4, 16))
    compiled = load(str(tmp_path / "a"))
    keys = [f"f{k}" for k in range(len(rows))]
    for batch in (1, 3, 4, 16, 37):    # the any-batch entry, padded, exact, split
        dense, values, lengths = _kjt_batch(rows, batch, dense_in, seed=batch)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(values),
                                                  lengths=torch.from_numpy(lengths))
        with torch.no_grad():
            want = model(torch.from_numpy(dense), kjt).numpy()
        for index_type in (np.int64, np.int32):
            got = compiled.predict_kjt(dense, values.astype(index_type), lengths, logits=True)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        probs = compiled.predict_kjt(dense, values, lengths)
        np.testing.assert_allclose(probs, torch.sigmoid(torch.from_numpy(want)).numpy(),
                                   rtol=1e-5, atol=1e-6)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        np.testing.assert_array_equal(compiled.predict_jagged(dense, values, offsets), probs)
        lS_o, lS_i = reference_layout(values, offsets, len(rows))
        np.testing.assert_array_equal(compiled.predict(dense, lS_o, lS_i), probs)


def test_dlrm_compile_takes_a_torchrec_checkpoint(tmp_path):
    model = _torchrec_model((50, 20, 7), 8, 4, [8], [16, 1], seed=3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    res = run("dlrm-compile", "--load-model", str(tmp_path / "m.pt"), "-o",
              str(tmp_path / "m.dlrmc"), "--check", "9", "--buckets", "none", "--no-progress")
    diff = float(res.stdout.split("max |dlrmc - PyTorch| over batch 9:")[1].split()[0])
    assert diff < 1e-6, res.stdout
    compiled = load(str(tmp_path / "m.dlrmc"))
    assert compiled.manifest.output["name"] == "pred"
    dense, values, lengths = _kjt_batch((50, 20, 7), 5, 4, seed=1)
    with pytest.raises(InputError, match="values.*out of range for table 1|table 1"):
        bad = values.copy()
        bad[lengths[:5].sum()] = 20                 # table 1's first index, past its 20 rows
        compiled.predict_kjt(dense, bad, lengths)


def test_a_dlrm_train_checkpoint_runs_as_its_model_does(tmp_path):
    """TorchRec's DLRMTrain, the wrapper its DLRM example and MLPerf's training train and save
    (keys "model.sparse_arch...."), loads as the DLRM_DCN inside it."""
    from torchrec.models.dlrm import DLRMTrain

    rows = (40, 7, 90)
    model = _torchrec_model(rows, 8, 5, [16, 8], [32, 1], seed=4, dcn=(2, 4))
    torch.save(DLRMTrain(model).state_dict(), tmp_path / "train.pt")
    ours = load_model(tmp_path / "train.pt")
    assert (ours.arch.interaction_op, ours.arch.dcn_layers) == ("dcn", 2)
    compile_model(ours, ours.arch, None, str(tmp_path / "a"), log=lambda _: None, buckets=(8,))
    dense, values, lengths = _kjt_batch(rows, 8, 5, seed=2)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{k}" for k in range(len(rows))],
                                              values=torch.from_numpy(values),
                                              lengths=torch.from_numpy(lengths))
    with torch.no_grad():
        want = model(torch.from_numpy(dense), kjt).numpy()
    got = load(str(tmp_path / "a")).predict_kjt(dense, values, lengths, logits=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_torchrec_checkpoints_are_named(tmp_path):
    model = _torchrec_model((10, 12), 4, 3, [4], [8, 1], seed=0)
    sd = model.state_dict()
    cases = {
        "no last layer": ({k: v for k, v in sd.items() if not k.startswith("over_arch.model.1.")},
                          "over_arch.model.1.weight"),
        "hole": ({k: v for k, v in sd.items() if "dense_arch.model._mlp.0." not in k},
                 "dense_arch.model._mlp.<i>._linear.weight are"),
        "extra": (dict(sd, **{"over_arch.extra": torch.ones(2)}), "unexpected keys over_arch"),
        "width": (dict(sd, **{"over_arch.model.0._mlp.0._linear.weight": torch.ones(8, 5)}),
                  "takes 5 inputs"),
        "mixed dims": (dict(sd, **{
            "sparse_arch.embedding_bag_collection.embedding_bags.t1.weight": torch.ones(12, 6)}),
            "one common width"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / f"{name}.pt")
    dcn = _torchrec_model((10, 12), 4, 3, [4], [8, 1], seed=0, dcn=(2, 2)).state_dict()
    for name, (state, message) in {
            "layer hole": ({k: v for k, v in dcn.items() if not k.endswith("V_kernels.0")},
                           r"cross layers must be cross_l\.V_kernels\.0 \.\. N"),
            "rank": (dict(dcn, **{"inter_arch.crossnet.W_kernels.1": torch.ones(12, 3)}),
                     r"cross_l\.W_kernels\.1 has shape \[12, 3\], the architecture needs "
                     r"\[12, 2\]")}.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / f"{name}.pt")
    for kind, message in [   # tables shared by features, not said: refused, and why
            ("dot", "takes 10 inputs; the interaction of 2 features .* gives 7. It fits 3 "
                    "features on the 2 tables: tables shared .* --features-per-table"),
            ("dcn", r"cross_l.V_kernels.0 takes 4 features of width 4, 3 beside the dense one, "
                    "on 2 tables: tables shared .* --features-per-table"),
            ("projection", "proj_l1.0.weight takes 4 features .* on 2 tables: tables shared")]:
        torch.save(_shared_tables_model(kind).state_dict(), tmp_path / "shared.pt")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "shared.pt")
    with pytest.raises(CheckpointError, match="--features-per-table 2-1-1 must give a count "
                       "of at least 1 for each of the checkpoint's 2 tables"):
        load_model(tmp_path / "shared.pt", features_per_table=(2, 1, 1))
    from torchrec.inference.modules import quantize_embeddings
    torch.save(quantize_embeddings(model, dtype=torch.qint8, inplace=False).state_dict(),
               tmp_path / "quantized.pt")
    with pytest.raises(CheckpointError, match="t0.weight is torch.uint8, a quantized table, "
                       "and the file does not say the tables' types .* quantize_inference_model"):
        load_model(tmp_path / "quantized.pt")
    one_branch = {k: v for k, v in _torchrec_model(
        (10, 12), 4, 3, [4], [8, 1], seed=0, dcn=("projection", [8], [12])).state_dict().items()
        if "interaction_branch2" not in k}
    torch.save(one_branch, tmp_path / "one_branch.pt")
    with pytest.raises(CheckpointError, match="DLRM_Projection needs both"):
        load_model(tmp_path / "one_branch.pt")


SHARED_ROWS = (10, 12)        # t0 serves features a and b, t1 feature c


def _shared_tables_model(interaction: str):
    torch.manual_seed(5)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=SHARED_ROWS[0],
                           feature_names=["a", "b"]),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=SHARED_ROWS[1],
                           feature_names=["c"])])
    args = dict(embedding_bag_collection=ebc, dense_in_features=3, dense_arch_layer_sizes=[4],
                over_arch_layer_sizes=[8, 1])
    if interaction == "dcn":
        return DLRM_DCN(**args, dcn_num_layers=2, dcn_low_rank_dim=3).eval()
    if interaction == "projection":
        return DLRM_Projection(**args, interaction_branch1_layer_sizes=[8],
                               interaction_branch2_layer_sizes=[4]).eval()
    return TorchRecDLRM(**args).eval()


@pytest.mark.parametrize("interaction", ["dot", "dcn", "projection"])
def test_tables_shared_by_features_run_as_torchrec_does(interaction, tmp_path):
    """An EmbeddingBagConfig with several feature_names: --features-per-table says how many
    (the state_dict cannot), and each feature reads its table as TorchRec's does."""
    model = _shared_tables_model(interaction)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    run("dlrm-compile", "--load-model", tmp_path / "m.pt", "--features-per-table", "2-1",
        "-o", tmp_path / "m.dlrmc", "--buckets", "4", "--no-progress")
    compiled = load(str(tmp_path / "m.dlrmc"))
    feature_rows = (SHARED_ROWS[0], SHARED_ROWS[0], SHARED_ROWS[1])
    assert compiled.arch["embedding_sizes"] == list(feature_rows)
    for batch in (3, 4, 9):
        dense, values, lengths = _kjt_batch(feature_rows, batch, 3, seed=batch)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"],
                                                  values=torch.from_numpy(values),
                                                  lengths=torch.from_numpy(lengths))
        with torch.no_grad():
            want = model(torch.from_numpy(dense), kjt).numpy()
        np.testing.assert_allclose(compiled.predict_kjt(dense, values, lengths, logits=True),
                                   want, rtol=1e-5, atol=1e-5)
    res = run("dlrm-compile", "--load-model", tmp_path / "m.pt", "--features-per-table", "2-x",
              "-o", tmp_path / "x.dlrmc", check=False)
    assert res.returncode == 2 and "--features-per-table must be dash-separated" in res.stderr
    if interaction == "dot":     # the flag describes a TorchRec checkpoint, and only that
        res = run("dlrm-compile", "--features-per-table", "2-1", "-o", tmp_path / "y.dlrmc",
                  check=False)
        assert res.returncode == 2 and "give it with --load-model" in res.stderr
        ours = load_model(tmp_path / "m.pt", features_per_table=(2, 1))
        torch.save(ours.state_dict(), tmp_path / "ours.pt")
        with pytest.raises(CheckpointError, match="--features-per-table is for TorchRec "
                           "checkpoints, .*ours.pt is not one"):
            load_model(tmp_path / "ours.pt", features_per_table=(2, 1))


def test_a_quantized_table_shared_by_features_is_read_once(tmp_path):
    """A quantized model's table that serves two features: decoded, both features hold one
    tensor; kept as stored, both read the same rows; either way TorchRec's logits."""
    model = _quantized(_shared_tables_model("dot"), {})
    torch.save(model.state_dict(), tmp_path / "q.pt")
    decoded = load_model(tmp_path / "q.pt", features_per_table=(2, 1))
    assert decoded.emb_l[0].weight.data_ptr() == decoded.emb_l[1].weight.data_ptr()
    assert decoded.emb_l[0].weight.data_ptr() != decoded.emb_l[2].weight.data_ptr()
    lazy = load_model(tmp_path / "q.pt", features_per_table=(2, 1), lazy_tables=True)
    assert lazy.table_sources["emb_l.0.weight"] is lazy.table_sources["emb_l.1.weight"]
    with pytest.raises(CheckpointError, match="weights_tys type 3 features; its 2 tables serve "
                       "2: tables shared by several features.*--features-per-table"):
        load_model(tmp_path / "q.pt")
    sd = model.state_dict()
    sd["sparse_arch.embedding_bag_collection.tbes.0.rows_per_table"] = torch.tensor([10, 9, 12])
    torch.save(sd, tmp_path / "differ.pt")
    with pytest.raises(CheckpointError, match="t0.weight serves 2 features, and their TBE "
                       "entries differ"):
        load_model(tmp_path / "differ.pt", features_per_table=(2, 1))
    feature_rows = (SHARED_ROWS[0], SHARED_ROWS[0], SHARED_ROWS[1])
    dense, values, lengths = _kjt_batch(feature_rows, 7, 3, seed=1)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"],
                                              values=torch.from_numpy(values),
                                              lengths=torch.from_numpy(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    lS_o, lS_i = reference_layout(values, offsets, 3)
    with torch.no_grad():
        want = model(torch.from_numpy(dense), kjt).numpy()
        got = decoded(torch.from_numpy(dense), torch.from_numpy(lS_o),
                      [torch.from_numpy(i) for i in lS_i]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    compile_model(lazy, lazy.arch, None, str(tmp_path / "a"), log=lambda _: None, buckets=(8,),
                  emb_quant=lazy.stored_quant)
    np.testing.assert_allclose(load(str(tmp_path / "a")).predict_kjt(dense, values, lengths,
                                                                     logits=True),
                               want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dcn", [None, (2, 3), ("projection", [16, 8], [8])],
                         ids=["dlrm", "dcn", "projection"])
def test_the_torchrec_peer_holds_our_weights(dcn, tmp_path):
    """dlrm-bench's TorchRec peer (our weights mapped back to TorchRec's names) computes what
    the TorchRec model we read them from computes."""
    from dlrmc.bench.peers import torchrec_eager

    rows = (30, 9, 14)
    model = _torchrec_model(rows, 8, 4, [8], [16, 1], seed=7, dcn=dcn)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ours = load_model(tmp_path / "m.pt")
    peer = torchrec_eager(ours, ours.arch)
    dense, values, lengths = _kjt_batch(rows, 6, 4, seed=2)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    lS_o, lS_i = reference_layout(values, offsets, len(rows))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{k}" for k in range(len(rows))],
                                              values=torch.from_numpy(values),
                                              lengths=torch.from_numpy(lengths))
    with torch.no_grad():
        want = model(torch.from_numpy(dense), kjt)
        got = peer(*peer.inputs(torch.from_numpy(dense), torch.from_numpy(lS_o),
                                [torch.from_numpy(i) for i in lS_i]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("peer_name", ["torchrec-compile", "torchrec-aoti"])
def test_the_compiled_torchrec_peers_compute_what_torchrec_eager_does(peer_name, tmp_path):
    """dlrm-bench's torch.compile and AOTInductor builds of TorchRec's DLRM_DCN, on batches
    of several sizes with variable and empty bags (AOTInductor's is exported once, with a
    symbolic batch and value count)."""
    from dlrmc.bench.peers import build_peer, torchrec_eager

    rows = (30, 9, 14, 5)
    torch.save(_torchrec_model(rows, 8, 4, [8], [16, 1], seed=5, dcn=(2, 3)).state_dict(),
               tmp_path / "m.pt")
    ours = load_model(tmp_path / "m.pt")
    eager = torchrec_eager(ours, ours.arch)
    peer = build_peer(peer_name, ours, ours.arch, 1, 2)
    for batch in (1, 3, 17):
        dense, values, lengths = _kjt_batch(rows, batch, 4, seed=batch)
        lS_o, lS_i = reference_layout(values, np.concatenate([[0], np.cumsum(lengths)]),
                                      len(rows))
        args = peer.inputs(torch.from_numpy(dense), torch.from_numpy(lS_o),
                           [torch.from_numpy(i) for i in lS_i])
        with torch.no_grad():
            torch.testing.assert_close(peer(*args), eager(*args), rtol=1e-5, atol=1e-6)


QUANTIZED = {   # TorchRec's per_table_weight_dtype for tables t0..t3 -> the artifact's tables
    "int8": ({}, "int8"),
    "int4": ({f"t{k}": torch.quint4x2 for k in range(4)}, "int4"),
    "mixed": ({"t0": torch.qint8, "t1": torch.quint4x2, "t2": torch.half, "t3": torch.quint2x4},
              None),
    "float": ({"t0": torch.float, "t1": torch.half, "t2": torch.half, "t3": torch.float},
              None),
}   # (bf16: FBGEMM's CPU quantize dies of SIGFPE making one; test_bf16_rows builds them)


def _quantized(model, spec: dict):
    from torchrec.inference.modules import quantize_inference_model

    return quantize_inference_model(copy.deepcopy(model), per_table_weight_dtype=spec or None,
                                    output_dtype=torch.float).eval()


@pytest.mark.parametrize("dcn", [None, (2, 4)], ids=["dot", "dcn"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_a_quantized_torchrec_model_runs_as_torchrec_runs_it(name, dcn, tmp_path):
    """TorchRec's quantized inference model (quantize_inference_model: FBGEMM's table-batched
    rows, int8, int4, int2, fp16, bf16 and fp32 tables) compiled from its state_dict gives
    the logits TorchRec's own quantized model gives: int8 and int4 tables keep their codes
    in the artifact, the rest are widened to float32."""
    rows = (40, 7, 90, 3)
    spec, kept = QUANTIZED[name]
    model = _quantized(_torchrec_model(rows, 8, 5, [16, 8], [32, 16, 1], seed=9, dcn=dcn), spec)
    torch.save(model.state_dict(), tmp_path / "q.pt")
    ours = load_model(tmp_path / "q.pt", lazy_tables=True)
    assert ours.stored_quant == kept
    compile_model(ours, ours.arch, None, str(tmp_path / "a"), log=lambda _: None,
                  buckets=(4, 16), emb_quant=kept)
    compiled = load(str(tmp_path / "a"))
    assert compiled.manifest.emb_quant == kept
    keys = [f"f{k}" for k in range(len(rows))]
    for batch in (1, 4, 9, 37):
        dense, values, lengths = _kjt_batch(rows, batch, 5, seed=batch)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(values),
                                                  lengths=torch.from_numpy(lengths))
        with torch.no_grad():
            want = model(torch.from_numpy(dense), kjt).numpy()
        np.testing.assert_allclose(compiled.predict_kjt(dense, values, lengths, logits=True),
                                   want, rtol=1e-5, atol=1e-5)
    decoded = load_model(tmp_path / "q.pt")      # tables decoded into memory
    assert not decoded.table_sources
    dense, values, lengths = _kjt_batch(rows, 6, 5, seed=2)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    lS_o, lS_i = reference_layout(values, offsets, len(rows))
    with torch.no_grad():
        eager = decoded(torch.from_numpy(dense), torch.from_numpy(lS_o),
                        [torch.from_numpy(i) for i in lS_i]).numpy()
    np.testing.assert_allclose(eager, compiled.predict(dense, lS_o, lS_i, logits=True),
                               rtol=1e-5, atol=1e-5)


def test_dlrm_compile_keeps_a_quantized_torchrec_models_codes(tmp_path):
    model = _quantized(_torchrec_model((50, 20, 7), 8, 4, [8], [16, 1], seed=3), {})
    state = model.state_dict()
    key = "sparse_arch.embedding_bag_collection.embedding_bags.t1.weight"
    state[key][:, 4:12] = state[key][:, 4:12] // 2 + 20     # codes that span 20..147 only
    torch.save(state, tmp_path / "q.pt")
    res = run("dlrm-compile", "--load-model", str(tmp_path / "q.pt"), "-o",
              str(tmp_path / "q.dlrmc"), "--check", "9", "--buckets", "8", "--no-progress")
    assert "tables are row-wise int8 (a quantized TorchRec model): kept as they are" in \
        res.stdout
    diff = float(res.stdout.split("max |dlrmc - PyTorch| over batch 9:")[1].split()[0])
    assert diff < 1e-6, res.stdout
    assert load(str(tmp_path / "q.dlrmc")).manifest.emb_quant == "int8"
    # the artifact holds TorchRec's rows: 8 codes, then its float16 scale and bias as float32
    from dlrmc.artifact import read_manifest, read_weights
    m = read_manifest(str(tmp_path / "q.dlrmc"))
    tables = [w for w in read_weights(str(tmp_path / "q.dlrmc"), m) if w.dtype == np.uint8]
    stored = state[key].numpy()
    np.testing.assert_array_equal(tables[1][:, :8], stored[:, 4:12])
    np.testing.assert_array_equal(tables[1][:, 8:].copy().view("<f4"),
                                  stored[:, :4].copy().view("<f2").astype(np.float32))


def test_bad_quantized_torchrec_checkpoints_are_named(tmp_path):
    sd = _quantized(_torchrec_model((10, 12), 8, 3, [8], [8, 1], seed=0), {}).state_dict()
    tbe = "sparse_arch.embedding_bag_collection.tbes.0."
    table = "sparse_arch.embedding_bag_collection.embedding_bags.t1.weight"
    cases = {
        "untyped": ({k: v for k, v in sd.items() if not k.endswith("weights_tys")},
                    "does not say the tables' types"),
        "pruned": (dict(sd, **{tbe + "index_remappings_array": torch.arange(3, dtype=torch.int32)}),
                   "index_remappings_array is not empty: pruned tables"),
        "type": (dict(sd, **{tbe + "weights_tys": torch.tensor([2, 9], dtype=torch.uint8)}),
                 "FBGEMM table type 9"),
        "count": (dict(sd, **{tbe + "weights_tys": torch.tensor([2], dtype=torch.uint8)}),
                  "weights_tys and .*D_offsets do not describe the same tables"),
        "0-d types": (dict(sd, **{tbe + "weights_tys": torch.tensor(2, dtype=torch.uint8)}),
                      "weights_tys and .*D_offsets do not describe the same tables"),
        "float types": (dict(sd, **{tbe + "weights_tys": torch.tensor([2.0, 2.0])}),
                        "weights_tys and .*D_offsets do not describe the same tables"),
        "0-d rows": (dict(sd, **{tbe + "rows_per_table": torch.tensor(12)}),
                     r"rows_per_table is torch.int64 \[\]; .*weights_tys types 2 tables"),
        "rows count": (dict(sd, **{tbe + "rows_per_table": torch.tensor([10, 12, 3])}),
                       r"rows_per_table is torch.int64 \[3\]"),
        "negative width": (dict(sd, **{tbe + "D_offsets": torch.tensor([0, 8, 4],
                                                                        dtype=torch.int32)}),
                           "t1.weight has 12 rows of 16 bytes; its TBE says 12 rows of -4"),
        "narrow": (dict(sd, **{table: sd[table][:, :8].clone()}),
                   r"t1.weight has 12 rows of 8 bytes; its TBE says 12 rows of 8 int8 values "
                   r"\(12 bytes each\)"),
        "rows": (dict(sd, **{table: sd[table][:5].clone()}), "has 5 rows of 16 bytes; its TBE "
                 "says 12 rows"),
        "float among": (dict(sd, **{table: torch.ones(12, 8)}), "t1.weight is torch.float32"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / f"{name}.pt")


def test_bf16_rows_are_read_as_torch_widens_them(tmp_path):
    """A quantized model's bf16 table (FBGEMM's type 5), its rows made here from an fp32
    table's with torch's own bfloat16 rounding: read as torch widens bf16 to float32."""
    spec = {f"t{k}": torch.float for k in range(2)}
    sd = _quantized(_torchrec_model((10, 12), 8, 3, [8], [8, 1], seed=1), spec).state_dict()
    table = "sparse_arch.embedding_bag_collection.embedding_bags.t1.weight"
    values = sd[table][:, :32].contiguous().view(torch.float32)          # [12, 8]
    bf16 = values.to(torch.bfloat16)
    sd[table] = torch.cat([bf16.view(torch.uint8), torch.zeros(12, 16, dtype=torch.uint8)], 1)
    sd["sparse_arch.embedding_bag_collection.tbes.0.weights_tys"] = torch.tensor(
        [0, 5], dtype=torch.uint8)
    torch.save(sd, tmp_path / "bf16.pt")
    ours = load_model(tmp_path / "bf16.pt")
    np.testing.assert_array_equal(ours.emb_l[1].weight.detach().numpy(), bf16.float().numpy())
    assert not np.array_equal(bf16.float().numpy(), values.numpy())      # rounding happened
