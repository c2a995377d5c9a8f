"""Checkpoints that distributed training writes as a directory, read as one state dict
without running the writers' code (``--load-model DIR``):

- **torch.distributed.checkpoint** (DCP, ``dcp.save``: how TorchRec and torchtitan save a
  ``DistributedModelParallel`` model): ``DIR/.metadata``, a pickle, is read by an unpickler
  that builds DCP's own metadata classes and torch's sizes and dtypes and refuses anything
  else; the tensors (``__<rank>_<n>.distcp``) are read by DCP itself, with
  ``torch.load(weights_only=True)``, and each is put back together from the chunks the ranks
  wrote.
- **torchsnapshot** (``Snapshot.take``; MLPerf's DLRM-v2 reference weights ship as one):
  ``DIR/.snapshot_metadata`` (JSON) lists every tensor's file, byte range, dtype and shape;
  raw tensors ("buffer_protocol") are mapped from their files, ``torch.save``d ones
  ("torch_save") loaded with ``weights_only``; sharded tables (``ShardedTensor``, from every
  rank) and chunked tensors are assembled (in memory, or past half of it in mapped temporary
  files: ``_allocator``). Objects are never unpickled.

Both keep the model's key order (its tables' order, which is the EmbeddingBagCollection's):
DCP in the ``planner_data`` every rank contributes (its ``state_dict_metadata`` is in the order
the ranks wrote the chunks in), torchsnapshot in the key list of the state dict's container.
Files are named by the metadata: a name outside the directory, a missing or short file, or a
byte range that does not hold its tensor is a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import pickle
import shutil
import tempfile
import warnings
from collections import OrderedDict
from urllib.parse import unquote

import numpy as np
import torch

from .checkpoint import CheckpointError


DCP_METADATA, SNAPSHOT_METADATA = ".metadata", ".snapshot_metadata"


def read_directory(path: str) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a DCP or torchsnapshot checkpoint directory, in the model's order."""
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        return _read_dcp(path)
    if os.path.isfile(os.path.join(path, SNAPSHOT_METADATA)):
        return _read_snapshot(path)
    raise CheckpointError(
        f"{path!r} is a directory but not a checkpoint one: it has neither {DCP_METADATA} "
        f"(torch.distributed.checkpoint) nor {SNAPSHOT_METADATA} (torchsnapshot)")


def _data_file(root: str, name, what: str, end: int = 0) -> str:
    """``root``/``name`` for a file the metadata names: a relative path that stays inside
    ``root``, a regular file of at least ``end`` bytes."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.split("/"):
        raise CheckpointError(f"{what}: file {name!r} is not a path inside {root!r}")
    full = os.path.join(root, name)
    if not os.path.isfile(full):
        raise CheckpointError(f"{what}: file {name!r} is missing from {root!r}")
    if not os.path.realpath(full).startswith(os.path.join(os.path.realpath(root), "")):
        raise CheckpointError(f"{what}: file {name!r} is a link out of {root!r}")
    size = os.path.getsize(full)
    if size < end:
        raise CheckpointError(f"{what}: {name!r} has {size} bytes, the metadata needs {end} "
                              "(a truncated checkpoint?)")
    return full


def _sizes(values: list, what: str) -> list:
    """``values``, which must be non-negative integers."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{what} {values!r} is not a list of sizes")
    return values


def _tiles(boxes: list, shape: list, what: str) -> None:
    """Refuse pieces (offsets, sizes) of a tensor of ``shape`` that leave it, overlap, or
    leave a hole."""
    for off, size in boxes:
        _sizes(off + size, f"{what}: a piece at")
        if not (len(off) == len(size) == len(shape)
                and all(o + s <= n for o, s, n in zip(off, size, shape))):
            raise CheckpointError(f"{what}: a piece at {off} of size {size} is outside {shape}")
    for i, (a, sa) in enumerate(boxes):
        for b, sb in boxes[:i]:
            if all(x < y + sy and y < x + sx for x, sx, y, sy in zip(a, sa, b, sb)):
                raise CheckpointError(f"{what}: pieces at {b} and {a} overlap")
    if sum(math.prod(s) for _, s in boxes) != math.prod(shape):
        raise CheckpointError(f"{what}: its pieces do not cover {shape}")


def _fits_on_disk(root: str, nbytes: int, what: str) -> None:
    """Refuse metadata whose tensors would take more bytes than its files hold (before any
    memory is allocated for them)."""
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root)
                  for f in files)
    if nbytes > on_disk:
        raise CheckpointError(f"{what}: its tensors would take {nbytes} bytes, more than the "
                              f"{on_disk} bytes of the checkpoint's files")


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available (MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


SMALL_TENSOR = 1 << 20     # bytes: held in memory however big the checkpoint


def _allocator(nbytes: int, what: str):
    """``empty(shape, dtype)`` for the ``nbytes`` of tensors a checkpoint's pieces are
    assembled into: in memory when they take at most half the memory available, else (but
    for small ones) in files of the temporary directory, mapped, so the page cache can write
    them out instead of the OOM killer stepping in. Refused when the disk has no room either."""
    free = available_memory()
    if free is None or 2 * nbytes <= free:
        return lambda shape, dtype: torch.empty(shape, dtype=dtype)
    scratch = tempfile.gettempdir()
    room = shutil.disk_usage(scratch).free
    if nbytes > room:
        raise CheckpointError(f"{what}: assembling its tensors takes {nbytes / 1e9:.1f} GB; "
                              f"this machine has {free / 1e9:.1f} GB of memory available and "
                              f"{room / 1e9:.1f} GB free in {scratch} (TMPDIR)")

    def empty(shape, dtype):
        size = math.prod(shape) * dtype.itemsize
        if size < SMALL_TENSOR:
            return torch.empty(shape, dtype=dtype)
        with tempfile.TemporaryFile(dir=scratch) as f:   # gone from the disk once unmapped
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                raise CheckpointError(f"{what}: no room for {size / 1e9:.1f} GB more in "
                                      f"{scratch} (TMPDIR): {e}") from None
            raw = np.memmap(f, np.uint8, "r+", shape=(size,))
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    return empty


# ----------------------------------------------------------------------------------------
# torch.distributed.checkpoint

def _dcp_classes() -> dict:
    """(module, name) -> object: everything a DCP ``.metadata`` pickle may build."""
    from torch.distributed.checkpoint import filesystem, metadata
    allowed = {(metadata.__name__, n): getattr(metadata, n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
        if hasattr(metadata, n)}
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    allowed.update({("pathlib", n): getattr(pathlib, n) for n in (
        "Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")})
    allowed[("collections", "OrderedDict")] = OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else."""

    def __init__(self, f, what: str):
        super().__init__(f)
        self.what, self.allowed = what, _dcp_classes()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise CheckpointError(f"{self.what} refers to {module}.{name}, which checkpoint "
                                  "metadata does not hold; not loaded (it could run code)")
        return found


def _dcp_metadata(path: str):
    """DCP's metadata, each tensor's chunks tiling it and every file it names in place."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
    what = os.path.join(path, DCP_METADATA)
    try:
        with open(what, "rb") as f:
            md = _MetadataUnpickler(f, what).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises many types
        raise CheckpointError(f"cannot read {what}: {e}") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or \
            not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{what} is not torch.distributed.checkpoint metadata")
    nbytes, transformed = 0, False
    try:
        for key, m in md.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata):
                shape = _sizes(list(m.size), f"{what} ({key}): size")
                _tiles([(list(c.offsets), list(c.sizes)) for c in m.chunks], shape,
                       f"{what} ({key})")
                nbytes += math.prod(shape) * m.properties.dtype.itemsize
        for index, info in md.storage_data.items():
            _data_file(path, info.relative_path, f"{what} ({index.fqn})",
                       _sizes([info.offset, info.length], f"{what} ({index.fqn}): offset")[0]
                       + info.length)
            transformed |= bool(getattr(info, "transform_descriptors", None))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - fields of the wrong kinds
        raise CheckpointError(f"{what} is not torch.distributed.checkpoint metadata: "
                              f"{type(e).__name__} {e}") from None
    if not transformed:      # (compressed tensors may be larger than their files)
        _fits_on_disk(path, nbytes, what)
    return md


def _read_dcp(path: str) -> "OrderedDict[str, torch.Tensor]":
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = _dcp_metadata(path)

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            return md

    planned = md.planner_data if isinstance(md.planner_data, dict) else {}
    order = [k for k in planned if k in md.state_dict_metadata]
    seen = set(order)
    order += [k for k in md.state_dict_metadata if k not in seen]
    order = [k for k in order if isinstance(md.state_dict_metadata[k], TensorStorageMetadata)]
    # A training checkpoint holds more than the model: {"model": ..., "optimizer": ...}
    # (the model's keys under "model"), or the model's keys beside nested optimizer state.
    paths = {k: tuple(p) if isinstance(p := planned.get(k), (tuple, list)) and p else (k,)
             for k in order}
    if any(p[0] == "model" and len(p) > 1 for p in paths.values()):
        order = [k for k in order if paths[k][0] == "model" and len(paths[k]) > 1]
    elif any(len(p) > 1 for p in paths.values()) and any(len(p) == 1 for p in paths.values()):
        order = [k for k in order if len(paths[k]) == 1]
    if not order:
        raise CheckpointError(f"torch.distributed.checkpoint {path!r} holds no tensors")
    meta = [(k, md.state_dict_metadata[k]) for k in order]
    empty = _allocator(sum(math.prod(m.size) * m.properties.dtype.itemsize for _, m in meta),
                       path)
    tensors = OrderedDict((k, empty(tuple(m.size), m.properties.dtype)) for k, m in meta)
    try:
        with warnings.catch_warnings():     # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=SafeReader(path), no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP wraps what each rank's read raised
        raise CheckpointError(f"cannot read torch.distributed.checkpoint {path!r}: "
                              f"{str(e).strip()[-500:]}") from None
    return tensors


# ----------------------------------------------------------------------------------------
# torchsnapshot

_SNAPSHOT_DTYPES = {f"torch.{n}": getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool")}


def _snapshot_tensor(root: str, entry: dict, what: str) -> torch.Tensor:
    """One ``Tensor`` entry: mapped from its file (copy-on-write), or ``torch.load``ed."""
    dtype = _SNAPSHOT_DTYPES.get(entry.get("dtype"))
    shape = entry.get("shape")
    if dtype is None:
        raise CheckpointError(f"{what}: dtype {entry.get('dtype')!r} is not supported")
    if not isinstance(shape, list):
        raise CheckpointError(f"{what}: shape {shape!r} is not a list")
    _sizes(shape, f"{what}: shape")
    span = entry.get("byte_range")
    if span is not None and (not isinstance(span, list) or len(span) != 2 or
                             _sizes(span, f"{what}: byte_range")[0] > span[1]):
        raise CheckpointError(f"{what}: byte_range {span!r} is not [start, end]")
    file = _data_file(root, entry.get("location"), what, span[1] if span else 0)
    start, end = span if span else (0, os.path.getsize(file))
    serializer = entry.get("serializer")
    if serializer == "buffer_protocol":
        need = math.prod(shape) * dtype.itemsize
        if end - start != need:
            raise CheckpointError(f"{what}: {end - start} bytes hold no {entry['dtype']} "
                                  f"{shape} ({need} bytes)")
        if not need:
            return torch.empty(shape, dtype=dtype)
        raw = np.memmap(file, np.uint8, "c", offset=start, shape=(need,))
        if start % 16:        # a view would not be aligned as numpy aligns arrays: a copy
            raw = np.array(raw)
        return torch.from_numpy(raw).view(dtype).reshape(shape)
    if serializer == "torch_save":
        with open(file, "rb") as f:
            f.seek(start)
            blob = f.read(end - start)
        try:
            t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad blob
            raise CheckpointError(f"{what}: cannot load safely: {e}") from None
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or list(t.shape) != shape:
            raise CheckpointError(f"{what}: the saved tensor is not {entry['dtype']} {shape}")
        return t
    raise CheckpointError(f"{what}: serializer {serializer!r} is not supported")


def _assembled(root: str, pieces: list, shape, dtype, what: str, empty) -> torch.Tensor:
    """A tensor from pieces ({"offsets", "sizes", "tensor"}) that must tile ``shape``."""
    boxes = [(p.get("offsets"), p.get("sizes")) for p in pieces]
    if not all(isinstance(o, list) and isinstance(z, list) for o, z in boxes):
        raise CheckpointError(f"{what}: a piece's offsets or sizes are not lists")
    _tiles(boxes, shape, what)
    parts = [_snapshot_tensor(root, p.get("tensor") or {}, what) for p in pieces]  # (mapped)
    for part, (off, size) in zip(parts, boxes):
        if list(part.shape) != size or part.dtype != dtype:
            raise CheckpointError(f"{what}: the piece at {off} is {part.dtype} "
                                  f"{list(part.shape)}, not {dtype} {size}")
    out = empty(shape, dtype)     # no larger than the pieces' bytes, read above
    for part, (off, size) in zip(parts, boxes):
        out[tuple(slice(o, o + s) for o, s in zip(off, size))] = part
    return out


def _snapshot_entries(path: str) -> tuple[dict, dict]:
    """(logical path -> entry, merged over the ranks; rank 0's container entries)."""
    what = os.path.join(path, SNAPSHOT_METADATA)
    try:
        with open(what) as f:
            meta = json.load(f)       # torchsnapshot writes its YAML as JSON
        manifest = meta["manifest"]
        assert isinstance(manifest, dict)
    except Exception as e:  # noqa: BLE001 - a damaged file raises many types
        raise CheckpointError(f"cannot read {what}: {type(e).__name__} {e}") from None
    entries, containers = {}, {}
    for key, entry in manifest.items():
        rank, _, logical = key.partition("/")
        if not rank.isdigit() or not isinstance(entry, dict):
            raise CheckpointError(f"{what}: manifest entry {key!r} is not '<rank>/<path>'")
        kind = entry.get("type")
        if kind in ("dict", "OrderedDict", "list"):
            if rank == "0":
                containers[logical] = entry
        elif kind == "ShardedTensor":
            merged = entries.setdefault(logical, {"type": kind, "shards": []})
            merged["shards"] += [s for s in entry.get("shards", [])
                                 if s not in merged["shards"]]
        elif logical not in entries:
            entries[logical] = entry        # lowest rank first: replicated ones are rank 0's
    return entries, containers


def _read_snapshot(path: str) -> "OrderedDict[str, torch.Tensor]":
    entries, containers = _snapshot_entries(path)
    tensor_kinds = ("Tensor", "ShardedTensor", "ChunkedTensor")
    apps = sorted({k.split("/")[0] for k, e in entries.items()
                   if e.get("type") in tensor_kinds and "/" in k})
    if not apps:
        raise CheckpointError(f"torchsnapshot {path!r} holds no tensors")
    if len(apps) > 1 and "model" not in apps:
        raise CheckpointError(f"torchsnapshot {path!r} holds the tensors of "
                              f"{', '.join(map(repr, apps))}; expected one model (or 'model')")
    app = apps[0] if len(apps) == 1 else "model"
    keys = [f"{app}/{k.replace('%', '%25').replace('/', '%2F')}"
            for k in (containers.get(app) or {}).get("keys", [])]
    listed = set(keys)
    keys += sorted(k for k in entries if k.startswith(app + "/") and k not in listed)
    plan = []       # (name, what, entry, or the pieces with their shape and dtype)
    for logical in keys:
        entry = entries.get(logical)
        if entry is None or entry.get("type") not in tensor_kinds:
            continue           # a nested container, or an object: never unpickled
        name = ".".join(unquote(p) for p in logical.split("/")[1:])
        what = f"{path}: {name}"
        plan.append((name, what, entry if entry["type"] == "Tensor" else _pieces(entry, what)))
    empty = _allocator(sum(math.prod(p[1]) * p[2].itemsize for _, _, p in plan
                           if isinstance(p, tuple)), path)
    return OrderedDict((name, _snapshot_tensor(path, p, what) if isinstance(p, dict) else
                        _assembled(path, *p, what, empty)) for name, what, p in plan)


def _pieces(entry: dict, what: str) -> tuple[list, list, torch.dtype]:
    """A sharded or chunked tensor's (pieces, shape, dtype)."""
    pieces = entry.get("shards") if entry["type"] == "ShardedTensor" else entry.get("chunks")
    if not isinstance(pieces, list) or not pieces or not all(isinstance(p, dict) for p in pieces):
        raise CheckpointError(f"{what}: no shards or chunks listed")
    if entry["type"] == "ShardedTensor":    # its size: where the shards end
        first = (pieces[0].get("tensor") or {}).get("dtype")
        try:
            shape = [max(p["offsets"][d] + p["sizes"][d] for p in pieces)
                     for d in range(len(pieces[0]["offsets"]))]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"{what}: its shards' offsets and sizes are not lists of "
                                  "sizes") from None
    else:
        first, shape = entry.get("dtype"), entry.get("shape")
    dtype = _SNAPSHOT_DTYPES.get(first)
    if dtype is None or not isinstance(shape, list):
        raise CheckpointError(f"{what}: dtype {first!r} or shape {shape!r} not supported")
    return pieces, _sizes(shape, f"{what}: shape"), dtype
