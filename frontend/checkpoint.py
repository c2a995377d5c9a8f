"""Loading facebookresearch/dlrm checkpoints (``--save-model``) and bare state_dicts, safely.

A checkpoint is untrusted input. The reference saves numpy scalars (losses, accuracies)
beside the weights, which ``torch.load(weights_only=True)`` refuses; we allow exactly the
numpy types such files need and never fall back to unrestricted unpickling.

When the architecture flags are absent it is inferred from the weights: tables from
``emb_l.K.weight``, the MLPs from ``bot_l``/``top_l``, the interaction from the top MLP's input
width (the user is asked for ``--arch-interaction-op`` only when that is ambiguous).

A TorchRec ``torchrec.models.dlrm.DLRM`` state_dict is recognised by its keys and read without
TorchRec (``from_torchrec``): tables in the EmbeddingBagCollection's order (one feature a
table, as the KeyedJaggedTensor's keys must then come), the dense arch as the bottom MLP, the
over arch as the top MLP ending in logits (``output="logit"``). TorchRec's interaction takes
the strict upper triangle of the Gram matrix in row-major order, ours the strict lower one
(the same values, other order), so the over arch's first layer has its columns reordered to
match. ``DLRM_DCN``'s cross layers (``inter_arch.crossnet``) become our ``dcn`` interaction
and ``DLRM_Projection``'s two branches (``inter_arch.interaction_branch{1,2}``) our
``projection`` one, each in TorchRec's own feature order.

TorchRec's quantized inference model (``torchrec.inference.modules.quantize_inference_model``)
holds its tables as FBGEMM's table-batched rows (``StoredRows``); its state_dict names each
table's type in ``tbes.N.weights_tys``. They are read as they are: int8 and int4 tables
keep their codes in the artifact, and the others (fp16, bf16, fp32, int2) are widened to the
float32 values TorchRec computes with.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .arch import Arch, flag_name, top_input_width
from .model import DLRM
from .ops import interaction_pairs, num_pairs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture."""


def _numpy_safe_globals() -> list:
    """The numpy globals the reference's checkpoints pickle, under their numpy 1 and 2 names."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list = [np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((scalar, f"{mod}.scalar"))
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if name.endswith("DType") and isinstance(cls, type):
            allowed.append((cls, f"numpy.dtypes.{name}"))
    return allowed


def read_checkpoint(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Return the state_dict of a reference checkpoint (dict with "state_dict"), a bare one, or
    a checkpoint directory (``dlrmc.frontend.dist_checkpoint``: torch.distributed.checkpoint,
    torchsnapshot)."""
    path = os.fspath(path)
    if os.path.isdir(path):      # written by distributed training
        from .dist_checkpoint import read_directory
        return _unwrapped(read_directory(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    zipped = head[:4] == b"PK\x03\x04"
    other = _other_archive(path, head, zipped)
    if other:
        raise CheckpointError(f"{path!r} is {other}")
    if not zipped and head[:1] != b"\x80":     # torch.save writes a zip, or (legacy) a pickle
        raise CheckpointError(f"cannot load checkpoint {path!r}: it is neither a zip archive "
                              "nor a pickle, the two formats torch.save writes")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals() + _PACKED):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"cannot load checkpoint {path!r} safely: "
                              f"{_unpickling_refused(str(e))}") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(
            f"checkpoint {path!r} holds neither a state_dict nor a dict with a 'state_dict' of "
            "tensors")
    return _unwrapped({k: _unpacked(k, v) for k, v in sd.items()})


class _PackedUInt(torch.Tensor):
    """What ``read_checkpoint`` builds where a file pickles TorchRec's UInt4Tensor or
    UInt2Tensor (its int4 and int2 tables' type): none of TorchRec's code runs, and the plain
    uint8 tensor it wraps (``elem``) takes its place (``_unpacked``)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError("a stand-in for TorchRec's packed table; its data is .elem")


_PACKED = [(_PackedUInt, f"torchrec.tensor_types.UInt{bits}Tensor") for bits in (4, 2)]


def _unpacked(key: str, value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, _PackedUInt):
        return value
    elem = value.__dict__.get("elem")
    if type(elem) is not torch.Tensor or elem.dtype != torch.uint8 or elem.dim() != 2:
        raise CheckpointError(f"{key}: a TorchRec packed table without a 2-D uint8 tensor in it")
    return elem


def _unpickling_refused(message: str) -> str:
    """torch's weights_only error said for this command (not its advice to load unsafely)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found is None:
        return message
    name = found.group(1)
    if name.endswith(".ShardedTensor"):
        return ("it holds ShardedTensors, a DistributedModelParallel state dict that torch.save "
                "wrote one rank's shards of; save the model with torch.distributed.checkpoint "
                "(dcp.save) and pass its directory")
    return (f"it pickles {name}, which a checkpoint of weights does not need (dlrmc never "
            "unpickles code it does not know)")


# What wrappers put before a model's own keys: DistributedDataParallel ("module."), a
# torch.compile'd module ("_orig_mod."), TorchRec's DLRMTrain ("model.", the wrapper its DLRM
# example and MLPerf's training train), DistributedModelParallel ("_dmp_wrapped_module.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "_dmp_wrapped_module.")
# facebookresearch/dlrm wraps its two MLPs in DDP when it runs distributed.
_DDP_MLPS = re.compile(r"^(bot_l|top_l)\.module\.")


def _unwrapped(sd: dict) -> "OrderedDict[str, torch.Tensor]":
    """The state dict with the wrappers' prefixes taken off (all keys must carry one)."""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd = OrderedDict((_DDP_MLPS.sub(r"\1.", k), v) for k, v in sd.items())
    return _reference_embeddings(sd)


def _reference_embeddings(sd: "OrderedDict[str, torch.Tensor]"
                          ) -> "OrderedDict[str, torch.Tensor]":
    """facebookresearch/dlrm's compressed tables as plain ones. Mixed-dimension tables
    (``--md-flag``: ``emb_l.k.embs.weight`` [n, d], projected by ``emb_l.k.proj.weight``
    [D, d] after pooling) become ``embs @ proj.T``, which a sum pools to the same vectors
    (projection is linear). Quotient-remainder tables (``--qr-flag``) combine their two pooled
    bags, a product by default, which no one table reproduces for bags of several indices:
    refused by name."""
    qr = sorted({k.rsplit(".", 1)[0] for k in sd if re.fullmatch(r"emb_l\.\d+\.weight_[qr]", k)})
    if qr:
        raise CheckpointError(f"{', '.join(qr)}: quotient-remainder embeddings (the reference's "
                              "--qr-flag) are not supported")
    out = OrderedDict()
    for k, v in sd.items():
        m = re.fullmatch(r"emb_l\.(\d+)\.(embs|proj)\.weight", k)
        if not m:
            out[k] = v
        elif m.group(2) == "embs":
            table, proj = m.group(1), sd.get(f"emb_l.{m.group(1)}.proj.weight")
            if proj is not None and (proj.dim() != 2 or v.dim() != 2
                                     or proj.shape[1] != v.shape[1]):
                raise CheckpointError(f"emb_l.{table}: proj.weight {list(proj.shape)} does not "
                                      f"project embs.weight {list(v.shape)}")
            out[f"emb_l.{table}.weight"] = v if proj is None else v.float() @ proj.float().T
    return out


_PASS_STATE_DICT = ("not a checkpoint: save the model's state_dict() with torch.save and "
                    "pass that")


def _other_archive(path: str, head: bytes, zipped: bool) -> str | None:
    """What a file that is no torch.save checkpoint but is often mistaken for one is, and
    what to do instead (TorchScript and torch.export archives, safetensors, ONNX, numpy's
    .npz), or None; ``head``: its first 9 bytes, ``zipped``: whether it is a zip."""
    if path.endswith(".onnx"):
        return "an ONNX model, not a checkpoint: compile it with --onnx"
    if len(head) == 9 and head[8:] == b"{" and \
            2 <= int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return f"a safetensors file, {_PASS_STATE_DICT}"
    if not zipped:
        return None
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None             # torch.load names the damage
    names = {n.split("/", 1)[-1] for n in members}
    if "constants.pkl" in names:
        return f"a TorchScript archive (torch.jit.save), {_PASS_STATE_DICT}"
    if "archive_format" in names or "models/model.json" in names:
        return f"a torch.export archive (torch.export.save), {_PASS_STATE_DICT}"
    if members and all(m.endswith(".npy") for m in members):
        return f"a numpy .npz archive, {_PASS_STATE_DICT}"
    return None


def _layers(sd: dict, prefix: str) -> list[tuple[int, ...]]:
    """Widths of a Sequential MLP stored as ``prefix.{2i}.weight``: [in, out1, out2, ...]."""
    idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(rf"{prefix}\.(\d+)\.weight", k)))
    if not idx:
        raise CheckpointError(f"no '{prefix}.N.weight' keys in the checkpoint")
    if idx != list(range(0, 2 * len(idx), 2)):
        raise CheckpointError(f"{prefix} layers are at {idx}, expected Linear layers at 0, 2, 4, ...")
    widths = [sd[f"{prefix}.0.weight"].shape[1]]
    for i in idx:
        w = sd[f"{prefix}.{i}.weight"]
        if w.dim() != 2 or w.shape[1] != widths[-1]:
            raise CheckpointError(f"{prefix}.{i}.weight has shape {tuple(w.shape)}, expected "
                                  f"[*, {widths[-1]}] to follow the previous layer")
        widths.append(w.shape[0])
    return widths


TORCHREC_TABLES = "sparse_arch.embedding_bag_collection.embedding_bags."
TORCHREC_TBES = "sparse_arch.embedding_bag_collection.tbes."     # a quantized model's
TORCHREC_CROSSNET = "inter_arch.crossnet."
TORCHREC_BRANCH = "inter_arch.interaction_branch{}.model._mlp"   # DLRM_Projection
# FBGEMM's SparseType numbers, as a quantized TorchRec model's weights_tys holds them
SPARSE_TYPES = {0: "fp32", 1: "fp16", 2: "int8", 3: "int4", 4: "int2", 5: "bf16"}
_CODE_BITS = {"int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True, eq=False)
class StoredRows:
    """A table as FBGEMM's table-batched inference rows hold it (TorchRec's quantized model):
    ``data`` uint8 [V, row bytes], each row ``dim`` values of ``kind`` (``SPARSE_TYPES``):
    float ones in the row's first bytes; int8, int4 and int2 ones as a float16 scale and
    bias, then the codes, several a byte from the low bits up. Decoded when asked, a table
    source as ``model.RandomTable`` is (``draw``, ``take``); ``codes`` gives an int8 or int4
    table's rows as stored."""

    data: np.ndarray
    kind: str
    dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.data), self.dim

    @property
    def quant(self) -> str | None:
        """"int8" or "int4", the row-wise quantisation these rows are in, or None."""
        return self.kind if self.kind in ("int8", "int4") else None

    @staticmethod
    def row_bytes(kind: str, dim: int) -> int:
        if kind in _CODE_BITS:
            return 4 + math.ceil(dim * _CODE_BITS[kind] / 8)
        return dim * (4 if kind == "fp32" else 2)

    def draw(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo`` to ``hi`` as float32, the values TorchRec computes with."""
        return self._decode(self.data[lo:hi])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self._decode(self.data[rows])

    def codes(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An int8 or int4 table's rows ``lo`` to ``hi`` as stored: the codes, uint8 [n,
        code bytes], and each row's scale and bias as float32."""
        return self._split(self.data[lo:hi])

    def _split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qparams = np.ascontiguousarray(rows[:, :4]).view("<f2").astype(np.float32)
        return rows[:, 4:self.row_bytes(self.kind, self.dim)], qparams[:, 0], qparams[:, 1]

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        d = self.dim
        if self.kind == "fp32":
            return np.ascontiguousarray(rows[:, :4 * d]).view("<f4")
        if self.kind == "fp16":
            return np.ascontiguousarray(rows[:, :2 * d]).view("<f2").astype(np.float32)
        if self.kind == "bf16":
            return (np.ascontiguousarray(rows[:, :2 * d]).view("<u2").astype(np.uint32)
                    << 16).view(np.float32)
        codes, scale, bias = self._split(rows)
        bits = _CODE_BITS[self.kind]
        values = np.stack([(codes >> s) & (2 ** bits - 1) for s in range(0, 8, bits)], axis=2)
        values = values.reshape(len(rows), -1)[:, :d].astype(np.float32)
        return values * scale[:, None] + bias[:, None]


def _stored_tables(sd: dict, tables: list[str], counts: tuple[int, ...]) -> list[StoredRows]:
    """The tables of TorchRec's quantized inference model, each typed and sized by its TBEs'
    ``weights_tys`` and ``D_offsets``, which list the features in the collection's order
    (table by table: ``counts`` features each, a shared table's entries repeated)."""
    tbes = sorted(int(m.group(1)) for k in sd
                  if (m := re.fullmatch(rf"{re.escape(TORCHREC_TBES)}(\d+)\.weights_tys", k)))
    if not tbes:
        raise CheckpointError(
            f"TorchRec checkpoint: {tables[0]} is {sd[tables[0]].dtype}, a quantized table, and "
            "the file does not say the tables' types (FBGEMM's tbes.N.weights_tys); save the "
            "state_dict of the model torchrec.inference's quantize_inference_model returns, "
            "which has them")
    if tbes != list(range(len(tbes))):
        raise CheckpointError(f"TorchRec checkpoint: its TBEs are {TORCHREC_TBES}{tbes}, "
                              "expected 0, 1, 2, ...")
    kinds, dims, rows = [], [], []
    for n in tbes:
        pre = f"{TORCHREC_TBES}{n}."
        tys, offsets, per = (sd.get(pre + name) for name in ("weights_tys", "D_offsets",
                                                              "rows_per_table"))
        if offsets is None or tys.dim() != 1 or offsets.dim() != 1 or \
                len(offsets) != len(tys) + 1 or tys.is_floating_point() or \
                offsets.is_floating_point():
            raise CheckpointError(f"TorchRec checkpoint: {pre}weights_tys and {pre}D_offsets "
                                  "do not describe the same tables")
        if per is not None and (per.shape != tys.shape or per.is_floating_point()):
            raise CheckpointError(f"TorchRec checkpoint: {pre}rows_per_table is "
                                  f"{per.dtype} {list(per.shape)}; {pre}weights_tys types "
                                  f"{len(tys)} tables")
        for remap in ("index_remappings_array", "index_remapping_hash_table"):
            if sd.get(pre + remap) is not None and sd[pre + remap].numel():
                raise CheckpointError(f"TorchRec checkpoint: {pre}{remap} is not empty: pruned "
                                      "tables (ids remapped to rows) are not supported")
        for ty in tys.tolist():
            if ty not in SPARSE_TYPES:
                raise CheckpointError(f"TorchRec checkpoint: {pre}weights_tys holds FBGEMM "
                                      f"table type {ty}; supported: {SPARSE_TYPES}")
            kinds.append(SPARSE_TYPES[ty])
        dims += np.diff(offsets.numpy().astype(np.int64)).tolist()
        rows += per.tolist() if per is not None else [None] * len(tys)
    if len(kinds) != sum(counts):
        raise CheckpointError(
            f"TorchRec checkpoint: its TBEs' weights_tys type {len(kinds)} features; its "
            f"{len(tables)} tables serve {sum(counts)}" +
            (SHARED_TABLES if len(kinds) > len(tables) else ""))
    out = []
    for key, f, count in zip(tables, np.cumsum([0, *counts[:-1]]).tolist(), counts):
        kind, dim, n = kinds[f], dims[f], rows[f]
        if {(k, d, r) for k, d, r in zip(*(x[f:f + count] for x in (kinds, dims, rows)))} != \
                {(kind, dim, n)}:
            raise CheckpointError(f"TorchRec checkpoint: {key} serves {count} features, and "
                                  "their TBE entries differ in type, width or rows")
        w = sd[key]
        if w.dtype != torch.uint8 or w.dim() != 2:
            raise CheckpointError(f"TorchRec checkpoint: {key} is {w.dtype} {list(w.shape)}, not "
                                  "the uint8 rows of a quantized model's table")
        need = StoredRows.row_bytes(kind, dim) if dim > 0 else 0
        if not need or w.shape[1] < need or n not in (None, w.shape[0]):
            raise CheckpointError(
                f"TorchRec checkpoint: {key} has {w.shape[0]} rows of {w.shape[1]} bytes; its "
                f"TBE says {n if n is not None else 'its'} rows of {dim} {kind} values "
                f"({need} bytes each)")
        out.append(StoredRows(w.numpy(), kind, dim))
    return out


def _torchrec_mlp(sd: dict, prefix: str, out: dict, target: str) -> int:
    """Copy TorchRec MLP layers ``prefix.<i>._linear.{weight,bias}`` to ``target.{2i}``;
    the number of layers."""
    idx = sorted(int(m.group(1)) for k in sd
                 if (m := re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\._linear\.weight", k)))
    if idx != list(range(len(idx))) or not idx:
        raise CheckpointError(f"TorchRec checkpoint: the layers {prefix}.<i>._linear.weight are "
                              f"{idx or 'missing'}, expected 0, 1, 2, ...")
    for i in idx:
        for part in ("weight", "bias"):
            key = f"{prefix}.{i}._linear.{part}"
            if key not in sd:
                raise CheckpointError(f"TorchRec checkpoint: {key} is missing")
            out[f"{target}.{2 * i}.{part}"] = sd[key]
    return len(idx)


SHARED_TABLES = (": tables shared by several features (an EmbeddingBagConfig with several "
                 "feature_names); say how many features each table has, in order, with "
                 "--features-per-table (e.g. 2-1-1)")


def _check_tables_together(sd: dict) -> None:
    """The tables' order is the features' order, and a state_dict is its only record: a
    model's ``state_dict()`` lists them together (first, or after the dense parts under
    DistributedModelParallel). Refuse one that interleaves them with other keys, as a file
    written from another listing does (``dcp_to_torch_save`` writes DCP's, which mixes them
    with the rest when several ranks saved them): its tables' order cannot be trusted."""
    keys = list(sd)
    where = [i for i, k in enumerate(keys) if k.startswith(TORCHREC_TABLES)]
    stray = next((k for k in keys[where[0]:where[-1]] if not k.startswith(TORCHREC_TABLES)),
                 None)
    if stray is not None:
        raise CheckpointError(
            f"TorchRec checkpoint: {stray} comes between the tables, so its keys are not in a "
            "model's state_dict order and the tables' order (the features' order) cannot be "
            "trusted; a file converted from a torch.distributed.checkpoint (dcp_to_torch_save) "
            "is in DCP's order: pass the checkpoint directory itself")


def from_torchrec(sd: dict, features_per_table: tuple[int, ...] | None = None
                  ) -> tuple[dict, dict, dict] | None:
    """A TorchRec DLRM state_dict as ours, the Arch fields it fixes, and the tables a
    quantized model stores (our state_dict name -> ``StoredRows``; in ours they are float32
    tensors on the meta device); None when ``sd`` is not TorchRec's.
    ``features_per_table``: how many features each table serves (an EmbeddingBagConfig's
    feature_names, which a state_dict does not record); a table that serves several becomes
    that many of ours, holding the same tensor (the features come table by table, as
    TorchRec's EmbeddingBagCollection orders them)."""
    if not any(k.startswith(TORCHREC_TABLES) for k in sd):
        return None
    _check_tables_together(sd)
    out: dict = {}
    tables = [k for k in sd if k.startswith(TORCHREC_TABLES)]
    counts = features_per_table or (1,) * len(tables)
    if len(counts) != len(tables) or min(counts) < 1:
        raise CheckpointError(f"--features-per-table {'-'.join(map(str, counts))} must give a "
                              f"count of at least 1 for each of the checkpoint's {len(tables)} "
                              "tables")
    for key in tables:
        if not key.endswith(".weight"):
            raise CheckpointError(f"TorchRec checkpoint: unexpected table key {key}")
    values = {key: sd[key] for key in tables}
    stored = {}
    if not all(v.is_floating_point() for v in values.values()):
        stored = dict(zip(tables, _stored_tables(sd, tables, counts)))
        values = {key: torch.empty(rows.shape, device="meta") for key, rows in stored.items()}
    feature_tables = [key for key, n in zip(tables, counts) for _ in range(n)]
    for k, key in enumerate(feature_tables):
        out[f"emb_l.{k}.weight"] = values[key]
    stored = {f"emb_l.{k}.weight": stored[key] for k, key in enumerate(feature_tables)
              if key in stored}
    _torchrec_mlp(sd, "dense_arch.model._mlp", out, "bot_l")
    hidden = _torchrec_mlp(sd, "over_arch.model.0._mlp", out, "top_l")
    for part in ("weight", "bias"):
        key = f"over_arch.model.1.{part}"
        if key not in sd:
            raise CheckpointError(f"TorchRec checkpoint: {key} (the over arch's last layer) is "
                                  "missing")
        out[f"top_l.{2 * hidden}.{part}"] = sd[key]
    branches = [_torchrec_mlp(sd, TORCHREC_BRANCH.format(b), out, f"proj_l{b}")
                for b in (1, 2) if any(k.startswith(TORCHREC_BRANCH.format(b)) for k in sd)]
    cross = {k: v for k, v in sd.items() if k.startswith(TORCHREC_CROSSNET)}
    out.update((f"cross_l.{k[len(TORCHREC_CROSSNET):]}", v) for k, v in cross.items())
    known = set(tables) | set(cross) | {k for k in sd if k.startswith((
        "dense_arch.model._mlp.", "over_arch.model.", TORCHREC_BRANCH.format(1),
        TORCHREC_BRANCH.format(2)))} | ({k for k in sd if k.startswith(TORCHREC_TBES)}
                                         if stored else set())
    unexpected = sorted(set(sd) - known)
    if unexpected:
        raise CheckpointError(f"TorchRec checkpoint: unexpected keys {', '.join(unexpected[:6])}")
    # DLRM_DCN's cross layers keep the concatenated features' order, and DLRM_Projection's
    # branches take TorchRec's own: ``infer_arch`` reads those interactions from our keys.
    if len(branches) == 1:
        raise CheckpointError(f"TorchRec checkpoint: a DLRM_Projection needs both "
                              f"{TORCHREC_BRANCH.format(1)} and {TORCHREC_BRANCH.format(2)}")
    dense = _layers(out, "bot_l")[-1]
    if cross or branches:
        # both take the features concatenated: [(tables + 1) * dim] wide
        key = "cross_l.V_kernels.0" if cross else "proj_l1.0.weight"
        width = out[key].shape[-1] if key in out else 0     # (a missing one: infer_arch)
        dim = values[tables[0]].shape[-1]
        if dim and width % dim == 0 and width // dim - 1 > len(feature_tables):
            raise CheckpointError(f"TorchRec checkpoint: {key} takes {width // dim} features of "
                                  f"width {dim}, {width // dim - 1} beside the dense one, on "
                                  f"{len(tables)} tables{SHARED_TABLES}")
        return out, {"output": "logit"}, stored
    first = out["top_l.0.weight"]
    features = len(feature_tables) + 1
    if first.dim() != 2 or first.shape[1] != dense + num_pairs(features, False):
        width = first.shape[1] if first.dim() == 2 else None
        shared = next((f - 1 for f in range(features + 1, 4096)
                       if width and dense + num_pairs(f, False) == width), None)
        raise CheckpointError(
            f"TorchRec checkpoint: over_arch.model.0._mlp.0._linear.weight takes "
            f"{width or '?'} inputs; the interaction of {len(feature_tables)} features and a "
            f"dense output of {dense} gives {dense + num_pairs(features, False)}" + (
                f". It fits {shared} features on the {len(tables)} tables{SHARED_TABLES}"
                if shared else ""))
    order = torchrec_pair_order(features)
    out["top_l.0.weight"] = torch.cat([first[:, :dense], first[:, dense:][:, order]], dim=1)
    return out, {"interaction_op": "dot", "interaction_itself": False, "output": "logit"}, stored


def torchrec_pair_order(features: int) -> list[int]:
    """For each of our interaction columns, TorchRec's column of the same pair: ours hold
    pair (i, j), j < i, in row-major lower order; TorchRec's the pair as (j, i), in row-major
    strict upper order."""
    li, lj = interaction_pairs(features, False)
    upper = {(a, b): c for c, (a, b) in enumerate(
        (a, b) for a in range(features) for b in range(a + 1, features))}
    return [upper[(j, i)] for i, j in zip(li.tolist(), lj.tolist())]


def to_torchrec(sd: dict, arch: Arch) -> dict:
    """Our DLRM's state_dict as TorchRec's DLRM / DLRM_DCN names it (tables ``t0``, ``t1``,
    ...): ``from_torchrec`` the other way, for running TorchRec beside us."""
    out = {}
    for k in range(arch.num_tables):
        out[f"{TORCHREC_TABLES}t{k}.weight"] = sd[f"emb_l.{k}.weight"]
    for i in range(len(arch.mlp_bot) - 1):
        for part in ("weight", "bias"):
            out[f"dense_arch.model._mlp.{i}._linear.{part}"] = sd[f"bot_l.{2 * i}.{part}"]
    last = len(arch.ln_top) - 2
    for i in range(last + 1):
        for part in ("weight", "bias"):
            key = (f"over_arch.model.1.{part}" if i == last
                   else f"over_arch.model.0._mlp.{i}._linear.{part}")
            out[key] = sd[f"top_l.{2 * i}.{part}"]
    out.update((TORCHREC_CROSSNET + k[len("cross_l."):], v) for k, v in sd.items()
               if k.startswith("cross_l."))
    for b in (1, 2):
        for i in range(len(arch.proj_widths(b)) - 1):
            for part in ("weight", "bias"):
                out[f"{TORCHREC_BRANCH.format(b)}.{i}._linear.{part}"] = \
                    sd[f"proj_l{b}.{2 * i}.{part}"]
    if arch.interaction_op == "dot":
        first, dense = out["over_arch.model.0._mlp.0._linear.weight"], arch.mlp_bot[-1]
        back = np.argsort(torchrec_pair_order(arch.num_tables + 1))
        out["over_arch.model.0._mlp.0._linear.weight"] = torch.cat(
            [first[:, :dense], first[:, dense:][:, torch.from_numpy(back)]], dim=1)
    return out


def _cross_fields(sd: dict) -> dict:
    """The dcn_layers and dcn_low_rank that ``cross_l.*`` keys imply."""
    layers = sorted(int(m.group(1)) for k in sd
                    if (m := re.fullmatch(r"cross_l\.V_kernels\.(\d+)", k)))
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"cross layers must be cross_l.V_kernels.0 .. N (TorchRec: "
                              f"inter_arch.crossnet.V_kernels.0 .. N), found {layers}")
    v = sd["cross_l.V_kernels.0"]
    if v.dim() != 2:
        raise CheckpointError(f"cross_l.V_kernels.0 has shape {list(v.shape)}, expected [rank, "
                              "width]")
    return {"dcn_layers": len(layers), "dcn_low_rank": int(v.shape[0])}


def _projection_fields(sd: dict) -> dict:
    """The proj_branch1/2 widths that ``proj_l1.*`` / ``proj_l2.*`` keys imply."""
    return {f"proj_branch{b}": tuple(_layers(sd, f"proj_l{b}")[1:]) for b in (1, 2)}


def infer_arch(sd: dict, given: dict | None = None) -> Arch:
    """The architecture the weights imply, with the user's ``given`` fields taking part."""
    given = dict(given or {})
    tables = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"emb_l\.(\d+)\.weight", k)))
    if not tables or tables != list(range(len(tables))):
        raise CheckpointError(f"embedding tables must be emb_l.0.weight .. emb_l.N.weight, found "
                              f"indices {tables}")
    shapes = [tuple(sd[f"emb_l.{k}.weight"].shape) for k in tables]
    dims = sorted({s[1] for s in shapes if len(s) == 2})
    if len(dims) != 1 or any(len(s) != 2 for s in shapes):
        listed = ", ".join(f"emb_l.{k}.weight {list(s)}" for k, s in zip(tables, shapes))
        raise CheckpointError(f"embedding tables must be 2-D with one common width, got {listed}")
    bot = _layers(sd, "bot_l")
    top = _layers(sd, "top_l")
    fields = dict(sparse_feature_size=dims[0], embedding_sizes=tuple(s[0] for s in shapes),
                  mlp_bot=tuple(bot), mlp_top=tuple(top[1:]))
    if any(k.startswith("v_W_l.") for k in sd):
        fields["weighted_pooling"] = "learned"
    if any(k.startswith("cross_l.") for k in sd):
        fields.update(_cross_fields(sd), interaction_op="dcn", interaction_itself=False)
        if given.get("interaction_op", "dcn") != "dcn":
            raise CheckpointError(f"the checkpoint has cross layers (cross_l.*): its interaction "
                                  f"is dcn, not {given['interaction_op']}")
        given.pop("interaction_op", None)
    if any(k.startswith(("proj_l1.", "proj_l2.")) for k in sd):
        fields.update(_projection_fields(sd), interaction_op="projection",
                      interaction_itself=False)
        if given.get("interaction_op", "projection") != "projection":
            raise CheckpointError(f"the checkpoint has projection branches (proj_l1.*, "
                                  f"proj_l2.*): its interaction is projection, not "
                                  f"{given['interaction_op']}")
        given.pop("interaction_op", None)
    if "interaction_op" not in given and "interaction_op" not in fields:
        options = [(op, it) for op, it in (("dot", False), ("dot", True), ("cat", False))
                   if top_input_width(len(shapes), bot[-1], op, it) == top[0]]
        if "interaction_itself" in given:
            options = [o for o in options if o[0] == "cat" or o[1] == given["interaction_itself"]]
        if not options:
            raise CheckpointError(
                f"top_l.0.weight takes {top[0]} inputs, which fits no interaction of "
                f"{len(shapes)} tables and a bottom MLP output of {bot[-1]} (dot: "
                f"{top_input_width(len(shapes), bot[-1], 'dot', False)}, dot itself: "
                f"{top_input_width(len(shapes), bot[-1], 'dot', True)}, cat: "
                f"{top_input_width(len(shapes), bot[-1], 'cat', False)})")
        if len(options) > 1:
            raise CheckpointError(
                f"the top MLP input width {top[0]} fits several interactions {options}; give "
                "--arch-interaction-op (and --arch-interaction-itself)")
        fields["interaction_op"], fields["interaction_itself"] = options[0]
    for k, v in given.items():
        if k in fields and k not in ("interaction_op", "interaction_itself") and fields[k] != v:
            raise CheckpointError(f"{flag_name(k)} is {_show(v)} but the checkpoint has "
                                  f"{_show(fields[k])}")
    fields.update(given)
    try:
        arch = Arch(**fields)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    check_state_dict(arch, sd)
    return arch


def _show(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_state_dict(arch: Arch, sd: dict) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    want = arch.weight_shapes()
    problems = [f"missing key {k} {list(s)}" for k, s in want.items() if k not in sd]
    problems += [f"unexpected key {k} {list(sd[k].shape)}" for k in sd if k not in want]
    problems += [f"{k} has shape {list(sd[k].shape)}, the architecture needs {list(s)}"
                 for k, s in want.items() if k in sd and tuple(sd[k].shape) != s]
    problems += [f"{k} has dtype {sd[k].dtype}, expected a floating type"
                 for k in want if k in sd and not sd[k].is_floating_point()]
    if problems:
        raise CheckpointError("checkpoint does not fit the architecture: " + "; ".join(problems))


def load_model(path: str | os.PathLike, given: dict | None = None,
               features_per_table: tuple[int, ...] | None = None,
               lazy_tables: bool = False) -> DLRM:
    """A DLRM holding the checkpoint's weights (no copy beyond a float32 cast); a TorchRec
    DLRM's too (``from_torchrec``, ``features_per_table`` for its shared tables). The tables
    of TorchRec's quantized model are decoded to float32, or with ``lazy_tables`` left on the
    meta device with their ``StoredRows`` as the model's ``table_sources`` (a compile writes
    them piece by piece, an int8 or int4 table's codes as they are)."""
    sd = read_checkpoint(path)
    torchrec = from_torchrec(sd, features_per_table)
    stored: dict = {}
    if features_per_table and torchrec is None:
        raise CheckpointError("--features-per-table is for TorchRec checkpoints, whose tables "
                              f"may serve several features; {path} is not one")
    if torchrec is not None:
        sd, fixed, stored = torchrec
        clash = {k: v for k, v in (given or {}).items() if k in fixed and fixed[k] != v}
        if clash:
            raise CheckpointError(f"a TorchRec DLRM checkpoint fixes "
                                  f"{', '.join(flag_name(k) for k in clash)}")
        given = {**(given or {}), **fixed}
    arch = infer_arch(sd, given)
    model = DLRM(arch, init=False)
    if stored and not lazy_tables:     # each table decoded once, however many features it serves
        decoded = {rows: torch.from_numpy(rows.draw(0, rows.shape[0]))
                   for rows in set(stored.values())}
        sd.update((k, decoded[rows]) for k, rows in stored.items())
        stored = {}
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model.table_sources.update(stored)
    return model.eval()
