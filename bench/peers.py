"""The systems ``dlrm-bench`` measures beside our artifact, each behind one small interface.

A peer is built once per model (``prepare``) and then called on batches in the reference
layout as torch tensors. Peers that need optional packages or long compiles say so with a
``PeerUnavailable`` naming the reason, and the bench reports it instead of a number.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Callable

import numpy as np
import torch

from ..frontend.arch import Arch
from ..frontend.checkpoint import to_torchrec
from ..frontend.export import example_batch
from ..runtime.model import time_calls


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here, with the reason."""


def eager(model, arch: Arch) -> Callable:
    return lambda d, o, i: model(d, o, i)


def torch_compile(model, arch: Arch) -> Callable:
    """torch.compile as its users run it for serving: mode "default", static shapes (one
    graph per batch size, compiled on the first, untimed, call of each)."""
    return torch.compile(model, dynamic=False, mode="default")


def graphs_compiled() -> int:
    """How many graphs TorchDynamo has compiled in this process (a count that moves while a
    peer is timed means its time includes compiling, and is not trusted)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def aot_inductor(model, arch: Arch) -> Callable:
    """AOTInductor: the model as PyTorch users have it (reference layout, ATen's embedding
    bags; not our flat op, which AOTInductor would run through Python) exported with a
    symbolic batch and index counts and compiled ahead of time into a .pt2 package."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    batch = torch.export.Dim("batch", min=1)
    dims = {"dense_x": {0: batch}, "lS_o": {1: batch},
            "lS_i": tuple({0: torch.export.Dim(f"indices_{k}", min=0)}
                          for k in range(arch.num_tables))}
    path = os.path.join(tempfile.mkdtemp(prefix="dlrmc-aoti-"), "model.pt2")
    with torch.no_grad():
        program = torch.export.export(model.eval(), example_batch(arch), dynamic_shapes=dims)
        aoti_compile_and_package(program, package_path=path)
    runner = aoti_load_package(path)
    return lambda d, o, i: runner(d, o, tuple(i))


class _FixedBags(torch.nn.Module):
    """The model with every bag holding exactly L indices, as Gather + ReduceSum (no
    EmbeddingBag op exists in ONNX); only valid for fixed-size bags."""

    def __init__(self, model, bag_size: int):
        super().__init__()
        self.model, self.bag = model, bag_size

    def forward(self, dense_x, indices):
        m = self.model
        x = m.bot_l(dense_x)
        ly = [e.weight[indices[k].view(-1, self.bag)].sum(1) for k, e in enumerate(m.emb_l)]
        return m.top_l(m.interact_features(x, ly))


def onnx_runtime(model, arch: Arch, bag_size, threads: int) -> Callable:
    """ONNX Runtime on the model exported with bags as Gather + ReduceSum."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PeerUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    if isinstance(bag_size, tuple):
        raise PeerUnavailable("the ONNX export here needs one bag size for every table")
    if arch.pooling != "sum" or arch.weighted_pooling:
        raise PeerUnavailable("the ONNX export here covers unweighted sum pooling only")
    path = os.path.join(tempfile.mkdtemp(prefix="dlrmc-ort-"), "model.onnx")
    wrapper = _FixedBags(model, bag_size).eval()
    dense = torch.zeros(2, arch.num_dense)
    idx = torch.zeros(arch.num_tables, 2 * bag_size, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (dense, idx), path, input_names=["dense_x", "indices"],
                          output_names=["pred"], dynamo=False, opset_version=17,
                          dynamic_axes={"dense_x": {0: "batch"}, "indices": {1: "n"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(d, o, i):
        return sess.run(None, {"dense_x": d.numpy(), "indices": torch.stack(list(i)).numpy()})[0]

    return run


class _TorchRecCall:
    """TorchRec's own model called on its own input: ``inputs`` turns a reference batch into
    (dense, KeyedJaggedTensor) outside the timing."""

    def __init__(self, model, keys):
        self.model, self.keys = model, keys

    def inputs(self, dense, lS_o, lS_i):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        lengths = torch.cat([torch.diff(o, append=torch.tensor([len(i)]))
                             for o, i in zip(lS_o, lS_i)])
        return dense, KeyedJaggedTensor.from_lengths_sync(keys=self.keys,
                                                          values=torch.cat(list(lS_i)),
                                                          lengths=lengths)

    def __call__(self, dense, kjt):
        return self.model(dense, kjt)


def _torchrec(model, arch: Arch):
    """TorchRec's DLRM, DLRM_DCN or DLRM_Projection holding ``model``'s weights, and its
    feature keys."""
    try:
        from torchrec.models.dlrm import DLRM as TorchRecDLRM, DLRM_DCN, DLRM_Projection
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
    except ImportError as e:
        raise PeerUnavailable(f"torchrec is not installed ({e})") from None
    if arch.output != "logit" or arch.interaction_op == "cat" or \
            arch.interaction_itself or arch.weighted_pooling or arch.pooling == "max":
        raise PeerUnavailable("TorchRec's DLRM is this model only for TorchRec-shaped "
                              "architectures (logits; dot without the diagonal, dcn or "
                              "projection)")
    keys = [f"f{k}" for k in range(arch.num_tables)]
    ebc = EmbeddingBagCollection(device=torch.device("meta"), tables=[
        EmbeddingBagConfig(name=f"t{k}", embedding_dim=arch.sparse_feature_size,
                           num_embeddings=n, feature_names=[keys[k]],
                           pooling=PoolingType[arch.pooling.upper()])
        for k, n in enumerate(arch.embedding_sizes)])
    args = dict(embedding_bag_collection=ebc, dense_in_features=arch.num_dense,
                dense_arch_layer_sizes=list(arch.mlp_bot[1:]),
                over_arch_layer_sizes=list(arch.mlp_top), dense_device=torch.device("meta"))
    if arch.interaction_op == "dcn":
        peer = DLRM_DCN(**args, dcn_num_layers=arch.dcn_layers,
                        dcn_low_rank_dim=arch.dcn_low_rank)
    elif arch.interaction_op == "projection":
        peer = DLRM_Projection(**args, interaction_branch1_layer_sizes=list(arch.proj_branch1),
                               interaction_branch2_layer_sizes=list(arch.proj_branch2))
    else:
        peer = TorchRecDLRM(**args)
    peer.load_state_dict(to_torchrec(model.state_dict(), arch), assign=True)
    return peer.eval(), keys


def torchrec_eager(model, arch: Arch) -> Callable:
    """TorchRec's DLRM, DLRM_DCN or DLRM_Projection (fbgemm-gpu-cpu kernels) holding the
    same weights."""
    return _TorchRecCall(*_torchrec(model, arch))


def torchrec_compile(model, arch: Arch) -> Callable:
    """The TorchRec model under torch.compile, as ``torch_compile`` runs ours: mode
    "default", static shapes (compiled on each batch's first, untimed, call)."""
    peer, keys = _torchrec(model, arch)
    return _TorchRecCall(torch.compile(peer, dynamic=False, mode="default"), keys)


def torchrec_aot_inductor(model, arch: Arch) -> Callable:
    """The TorchRec model exported non-strict (its KeyedJaggedTensor input with a symbolic
    batch and value count) and compiled ahead of time by AOTInductor into a .pt2 package."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    peer, keys = _torchrec(model, arch)
    call = _TorchRecCall(peer, keys)
    example = call.inputs(*example_batch(arch))
    batch = torch.export.Dim("batch", min=2)
    # the KeyedJaggedTensor's leaves: values, weights, lengths, offsets, and two caches
    kjt = [{0: torch.export.Dim("values", min=2)}, None, {0: arch.num_tables * batch}, None,
           None, None]
    path = os.path.join(tempfile.mkdtemp(prefix="dlrmc-aoti-torchrec-"), "model.pt2")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(peer, example, strict=False, dynamic_shapes={
            "dense_features": {0: batch}, "sparse_features": kjt})
        aoti_compile_and_package(program, package_path=path)
    return _TorchRecCall(aoti_load_package(path), keys)


PEERS = {"eager": "PyTorch eager", "compile": "torch.compile", "aoti": "AOTInductor",
         "ort": "ONNX Runtime", "torchrec": "TorchRec eager",
         "torchrec-compile": "TorchRec, torch.compile", "torchrec-aoti": "TorchRec, AOTInductor"}


def build_peer(name: str, model, arch: Arch, bag_size: int, threads: int) -> Callable:
    if name == "eager":
        return eager(model, arch)
    if name == "compile":
        return torch_compile(model, arch)
    if name == "aoti":
        return aot_inductor(model, arch)
    if name == "ort":
        return onnx_runtime(model, arch, bag_size, threads)
    if name == "torchrec":
        return torchrec_eager(model, arch)
    if name == "torchrec-compile":
        return torchrec_compile(model, arch)
    if name == "torchrec-aoti":
        return torchrec_aot_inductor(model, arch)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def gemm_rate(size: int = 1024) -> float:
    """Measured float32 GEMM FLOP/s of torch.mm at ``size`` cubed (torch's thread setting)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = time_calls(lambda: torch.mm(a, b), warmup=2, repeat=5)
    return 2 * size**3 * len(times) / sum(times)


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured bytes/s of a sequential read of ``nbytes`` (larger than the caches) summed by
    torch on its threads: an upper bound on any table gather's rate from memory (a random
    row read moves whole cache lines and cannot beat the prefetched stream)."""
    data = torch.ones(nbytes // 4)
    times = time_calls(lambda: data.sum(), warmup=1, repeat=5)
    return nbytes / min(times)
