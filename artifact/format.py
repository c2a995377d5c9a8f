"""The artifact directory: written here, read here, nowhere else.

Layout (format version 1)::

    OUT_DIR/
      model.so        the compiled Relax VM executable; weights are NOT inside it
      weights.bin     every weight, raw little-endian, each starting at a 64-byte boundary
      manifest.json

``manifest.json`` fields:

- ``format`` ("dlrmc-artifact") and ``format_version`` (checked by the reader);
- ``dlrmc_version``, ``tvm_version``;
- ``arch``: the ``dlrmc.frontend.arch.Arch`` fields;
- ``entry``: the VM function to call ("main"); ``transform_params``: the VM function that
  takes the list of weights in ``weights.tensors`` order and returns what ``entry`` takes
  after the ``inputs`` (packed dense weights, tables passed through); call it once at load;
- ``inputs``: ``[{name, dtype, shape}]``, a shape entry being an int or the name of a
  dynamic dim; ``dynamic_dims``: ``{name: [min, max or null]}``; ``output``: likewise;
- ``target``: ``{"string": what the user gave, "resolved": TVM's full target as JSON,
  "requires": {"machine": "x86_64", "cpu_flags": [/proc/cpuinfo flags the code uses]}}``;
- ``weights``: ``{"file": "weights.bin", "tensors": [{name, dtype, shape, offset, nbytes}]}``;
- ``files``: ``{file name: sha256}`` for model.so and weights.bin;
- ``tuning_log``: the tuning log's digest, or null when built with default schedules.

The writer builds everything in a temporary sibling directory and renames it into place
at the end, so a failed compile leaves nothing behind (and never a half-written artifact).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

import numpy as np

FORMAT = "dlrmc-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.bin"
ALIGN = 64


class ArtifactError(ValueError):
    """A missing, corrupt or incompatible artifact."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_weights(path: str, weights: Iterable[tuple[str, np.ndarray]]) -> tuple[list, str]:
    """Stream the arrays to ``path``; return their index and the file's sha256."""
    index, h, pos = [], hashlib.sha256(), 0
    with open(path, "wb") as f:
        for name, arr in weights:
            arr = np.ascontiguousarray(arr)
            pad = (-pos) % ALIGN
            if pad:
                f.write(b"\0" * pad)
                h.update(b"\0" * pad)
                pos += pad
            data = memoryview(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).cast("B")
            f.write(data)
            h.update(data)
            index.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                          "offset": pos, "nbytes": arr.nbytes})
            pos += arr.nbytes
    return index, h.hexdigest()


def write_artifact(out_dir: str, export_library: Callable[[str], None],
                   weights: Iterable[tuple[str, np.ndarray]], manifest: dict) -> dict:
    """Write the artifact atomically; ``export_library(path)`` writes the .so. Returns the manifest.

    An existing ``out_dir`` is replaced only if it is empty or an artifact itself.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (
            not os.listdir(out_dir) or os.path.isfile(os.path.join(out_dir, MANIFEST)))):
        raise ArtifactError(f"{out_dir} exists and is not a dlrmc artifact; not overwriting it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)
        # The library's code generation and the weights' write + hash overlap.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            library = pool.submit(export_library, os.path.join(tmp, LIBRARY))
            index, weights_sha = _write_weights(os.path.join(tmp, WEIGHTS), weights)
            library.result()
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
        manifest["weights"] = {"file": WEIGHTS, "tensors": index}
        manifest["files"] = {LIBRARY: _sha256(os.path.join(tmp, LIBRARY)), WEIGHTS: weights_sha}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "a"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(artifact_dir: str, verify: bool = True) -> dict:
    """Read and check the manifest; with ``verify`` also every file's sha256."""
    path = os.path.join(artifact_dir, MANIFEST)
    if not os.path.isdir(artifact_dir):
        raise ArtifactError(f"artifact directory {artifact_dir!r} does not exist")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{artifact_dir!r} is not a dlrmc artifact: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a dlrmc artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}; this "
                            f"dlrmc reads version {FORMAT_VERSION}: recompile the model")
    for name, digest in manifest.get("files", {}).items():
        fpath = os.path.join(artifact_dir, name)
        if not os.path.isfile(fpath):
            raise ArtifactError(f"artifact file {fpath} is missing")
        if verify and _sha256(fpath) != digest:
            raise ArtifactError(f"artifact file {fpath} is corrupt (sha256 mismatch)")
    return manifest


def read_weights(artifact_dir: str, manifest: dict) -> list[np.ndarray]:
    """The weights mapped copy-on-write from weights.bin (64-byte aligned), in ``main``'s order."""
    spec = manifest["weights"]
    path = os.path.join(artifact_dir, spec["file"])
    size = os.path.getsize(path)
    out = []
    for t in spec["tensors"]:
        if t["offset"] + t["nbytes"] > size:
            raise ArtifactError(f"{path} is truncated: {t['name']} ends past the end of the file")
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        count = int(np.prod(t["shape"], dtype=np.int64))
        if count * dtype.itemsize != t["nbytes"]:
            raise ArtifactError(f"{MANIFEST}: {t['name']} has inconsistent size")
        out.append(np.memmap(path, dtype=dtype, mode="c", offset=t["offset"],
                             shape=tuple(t["shape"])) if count else np.zeros(t["shape"], dtype))
    return out


def replace_weights(artifact_dir: str, weights: dict) -> dict:
    """Write new values for every weight of an artifact (same names, dtypes and shapes as
    its manifest lists; a retrained model, or weights made where the artifact is deployed)
    into ``weights.bin``, atomically, and update the manifest's index and digest."""
    manifest = read_manifest(artifact_dir, verify=False)
    arrays = []
    for t in manifest["weights"]["tensors"]:
        if t["name"] not in weights:
            raise ArtifactError(f"no new value for weight {t['name']!r}")
        a = np.asarray(weights[t["name"]])
        if str(a.dtype) != t["dtype"] or list(a.shape) != t["shape"]:
            raise ArtifactError(f"weight {t['name']!r}: expected {t['dtype']} {t['shape']}, got "
                                f"{a.dtype} {list(a.shape)}")
        arrays.append((t["name"], a))
    path = os.path.join(artifact_dir, manifest["weights"]["file"])
    index, digest = _write_weights(path + ".tmp", arrays)
    manifest["weights"]["tensors"] = index
    manifest["files"][manifest["weights"]["file"]] = digest
    with open(os.path.join(artifact_dir, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
    os.replace(os.path.join(artifact_dir, MANIFEST + ".tmp"), os.path.join(artifact_dir, MANIFEST))
    return manifest
