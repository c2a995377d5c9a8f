"""The artifact directory: written here, read here, nowhere else.

Layout (format version 3)::

    OUT_DIR/
      model.so         the compiled Relax VM executable; weights are NOT inside it
      weights.bin      every weight, raw little-endian, each starting at a 64-byte boundary,
                       in ``weights.tensors`` order with nothing else between them
      manifest.json
      manifest.sha256  the sha256 of manifest.json, in ``sha256sum`` format

``manifest.json`` holds a ``Manifest``: every builder constructs one (``dlrmc.compiler.build``,
``dlrmc.compiler.generic``), ``write_artifact`` completes and writes it, ``read_manifest``
checks and returns it, and the C++ runtime reads the same JSON fields. Its fields (every one
checked by the reader, a bad one named in an ``ArtifactError``):

- ``format`` ("dlrmc-artifact") and ``format_version`` (an integer; another version is
  refused with both versions named);
- ``dlrmc_version``, ``tvm_version``;
- ``arch``: the ``dlrmc.frontend.arch.Arch`` fields, or null for a graph compiled through
  the generic ONNX path (then ``generic``: ``{reason}`` and ``outputs`` like ``inputs``);
- ``entry``: the VM function to call ("main"); ``transform_params``: the VM function that
  takes the list of weights in ``weights.tensors`` order and returns what ``entry`` takes
  after the ``inputs`` (packed dense weights, tables passed through); call it once at load;
- ``buckets``: ``{batch: VM function}``, the static batch sizes compiled beside ``entry``
  (1 to ``MAX_BUCKET``);
- ``emb_quant``, ``precision``, ``mlp_quant``: the numerics it was built with;
- ``inputs``: ``[{name, dtype, shape}]``, a shape entry being an int, the name of a dynamic
  dim or an expression of one (a DLRM's: ``dense_x`` [batch, F], ``indices`` [indices],
  ``offsets`` ["T*batch+1"], the flat layout of ``dlrmc.frontend.ops``); ``dynamic_dims``:
  ``{name: [min, max or null]}``; ``output`` (a DLRM's) or ``outputs`` (a generic graph's):
  likewise;
- ``target``: ``{"string": what the user gave, "resolved": TVM's full target as JSON,
  "requires": what the machine needs, as the target's backend (``dlrmc.targets.backend``)
  states it: ``{"device": "cpu", "device_type": 1, "machine": "x86_64", "cpu_flags":
  [/proc/cpuinfo flags the code uses]}`` or ``{"device": "cuda", "device_type": 2,
  "cuda_arch": "sm_90"}``}`` (``device`` is TVM's name, ``device_type`` DLPack's number);
- ``weights``: ``{"file": "weights.bin", "tensors": [{name, dtype, shape, offset, nbytes}]}``;
- ``files``: ``{file name: {"sha256": hex digest, "bytes": size}}``: model.so and the weights
  file, each a plain name inside the artifact;
- ``tuning_log``: the tuning log's digest, or null when built with default schedules;
- ``checked_inputs`` (optional, default false): true when the compiled code checks a DLRM's
  flat ``indices`` and ``offsets`` itself before reading a table row (the CPU kernels,
  ``dlrmc.schedules.embedding_bag.check_flat_inputs``), so the runtime may call it without
  checking them first.

What the reader guarantees (``read_manifest``): manifest.json matches manifest.sha256 (always;
it is small), every field has its type, every file the loader reads is a plain regular file
inside the artifact, listed in ``files`` with its size checked (always) and its sha256
(``verify``), and the weight index is exactly the layout the writer writes. The digest file
catches a manifest edited or damaged on its own; someone who rewrites both files on purpose
is not stopped by it (sign the directory if that is the threat). Whether the weights fit the
architecture is the DLRM runtime's check (``dlrmc.runtime.model``).

The writer builds everything in a staging directory beside OUT_DIR and moves it into place at
the end (``dlrmc.artifact.staging``), so a failed or killed compile never leaves a
half-written artifact, and an existing one is replaced with no moment where none is there.
Only an artifact (a directory holding a dlrmc manifest and nothing but its own files) or an
empty directory is ever replaced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import mmap
import os
import shutil
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Callable, Iterable, Protocol

import numpy as np

from .staging import replace_dir, staging_dir

FORMAT = "dlrmc-artifact"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
LIBRARY = "model.so"
WEIGHTS = "weights.bin"
ALIGN = 64
# The largest batch bucket: a bucket is a static copy of the model for a batch size callers
# use often, and ``load`` runs each once (``dlrmc.runtime.model``), so a manifest may not ask
# for an absurd one.
MAX_BUCKET = 1 << 16


class ArtifactError(ValueError):
    """A missing, corrupt or incompatible artifact."""


@dataclass
class Manifest:
    """manifest.json (the module docstring says what each field means). Builders give the
    model's fields; ``write_artifact`` adds ``weights`` and ``files``."""

    arch: dict | None
    entry: str
    inputs: list
    target: dict
    buckets: dict = field(default_factory=dict)
    transform_params: str | None = None
    dynamic_dims: dict = field(default_factory=dict)
    output: dict | None = None
    outputs: list | None = None
    generic: dict | None = None
    emb_quant: str | None = None
    precision: str = "fp32"
    mlp_quant: str | None = None
    tuning_log: dict | None = None
    checked_inputs: bool = False
    dlrmc_version: str = field(default_factory=lambda: version("dlrmc"))
    tvm_version: str = field(default_factory=lambda: version("apache-tvm"))
    weights: dict | None = None
    files: dict | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        """A manifest read from JSON whose fields ``read_manifest`` has checked."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


CHUNK = 1 << 26     # bytes written (and reported to ``progress``) at a time


class StreamedArray(Protocol):
    """A weight written a piece at a time, never whole in memory: its ``shape`` and
    ``dtype``, and ``chunks()``, the C-order pieces whose bytes make it up, in order."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def chunks(self) -> Iterable[np.ndarray]: ...


def _write_weights(path: str, weights: Iterable[tuple[str, np.ndarray | StreamedArray]],
                   progress: Callable[[int], object] | None = None) -> tuple[list, str]:
    """Stream the arrays (or ``StreamedArray``s) to ``path``; return their index and the
    file's sha256. ``progress(n)`` is told each ``n`` bytes written."""
    index, h, pos = [], hashlib.sha256(), 0
    with open(path, "wb") as f:
        for name, arr in weights:
            pieces = [arr] if isinstance(arr, np.ndarray) else arr.chunks()
            dtype, shape = np.dtype(arr.dtype), tuple(int(d) for d in arr.shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            pad = (-pos) % ALIGN
            if pad:
                f.write(b"\0" * pad)
                h.update(b"\0" * pad)
                pos += pad
            written = 0
            for piece in pieces:
                piece = np.ascontiguousarray(piece, dtype.newbyteorder("<"))
                data = memoryview(piece).cast("B")
                for start in range(0, len(data), CHUNK):
                    chunk = data[start:start + CHUNK]
                    f.write(chunk)
                    h.update(chunk)
                    if progress:
                        progress(len(chunk))
                written += len(data)
            if written != nbytes:
                raise ArtifactError(f"weight {name}: {written} bytes were written, its shape "
                                    f"{list(shape)} and dtype {dtype} make {nbytes}")
            index.append({"name": name, "dtype": str(dtype), "shape": list(shape),
                          "offset": pos, "nbytes": nbytes})
            pos += nbytes
    return index, h.hexdigest()


def _file_entry(path: str, digest: str | None = None) -> dict:
    return {"sha256": digest or _sha256(path), "bytes": os.path.getsize(path)}


def _write_manifest(directory: str, manifest: Manifest) -> None:
    """manifest.json and its digest file."""
    data = json.dumps(manifest.to_json(), indent=1).encode()
    with open(os.path.join(directory, MANIFEST), "wb") as f:
        f.write(data)
    with open(os.path.join(directory, MANIFEST_DIGEST), "w") as f:
        f.write(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")


def _own_files(directory: str) -> set[str] | None:
    """The names an artifact directory may hold, from its manifest; None if it is not one."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = manifest.get("files")
    return {MANIFEST, MANIFEST_DIGEST} | (set(files) if isinstance(files, dict) else set())


def check_replaceable(out_dir: str) -> None:
    """Refuse an ``out_dir`` that exists and is not an empty directory or an artifact alone."""
    if not os.path.lexists(out_dir):
        return
    if os.path.islink(out_dir):
        raise ArtifactError(f"{out_dir} is a symbolic link; not replacing it (write to "
                            f"{os.path.realpath(out_dir)} itself)")
    if not os.path.isdir(out_dir):
        raise ArtifactError(f"{out_dir} exists and is not a directory; not overwriting it")
    present = set(os.listdir(out_dir))
    if not present:
        return
    own = _own_files(out_dir)
    if own is None:
        raise ArtifactError(f"{out_dir} exists and is not a dlrmc artifact; not overwriting it")
    if present - own:
        raise ArtifactError(f"{out_dir} is a dlrmc artifact but also holds "
                            f"{', '.join(sorted(present - own))}; not overwriting it")


SPACE_MARGIN = 1 << 28     # bytes beyond the weights a write wants free (library, objects)


def _check_space(directory: str, weight_bytes: int) -> None:
    """Refuse, before writing anything, a weights file the file system has no room for."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if weight_bytes + SPACE_MARGIN > free:
        raise ArtifactError(f"the artifact needs {(weight_bytes + SPACE_MARGIN) / 1e9:.3g} GB "
                            f"for its weights and library, and {os.path.dirname(directory)} has "
                            f"{free / 1e9:.3g} GB free")


def write_artifact(out_dir: str, export_library: Callable[[str, str], None],
                   weights: Iterable[tuple[str, np.ndarray]], manifest: Manifest,
                   progress: Callable[[int], object] | None = None,
                   weight_bytes: int | None = None) -> Manifest:
    """Write the artifact atomically; ``export_library(path, workspace)`` writes the .so,
    keeping its intermediate files under the directory ``workspace``; ``progress(n)`` is told
    of each ``n`` bytes of weights written. Returns the manifest. Given ``weight_bytes`` (the
    weights' size), a file system without room for them is refused before anything is written.

    An existing ``out_dir`` is replaced only if it is empty or an artifact and nothing else.
    """
    out_dir = os.path.abspath(out_dir)
    tmp = staging_dir(out_dir)         # puts back an artifact a killed replace had moved
    try:
        check_replaceable(out_dir)
        if weight_bytes is not None:
            _check_space(tmp, weight_bytes)
        workspace = os.path.join(tmp, ".build")
        os.mkdir(workspace)
        # The library's code generation and the weights' write + hash overlap.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            library = pool.submit(export_library, os.path.join(tmp, LIBRARY), workspace)
            index, weights_sha = _write_weights(os.path.join(tmp, WEIGHTS), weights, progress)
            library.result()
        shutil.rmtree(workspace)
        manifest = dataclasses.replace(
            manifest, format=FORMAT, format_version=FORMAT_VERSION,
            weights={"file": WEIGHTS, "tensors": index},
            files={LIBRARY: _file_entry(os.path.join(tmp, LIBRARY)),
                   WEIGHTS: _file_entry(os.path.join(tmp, WEIGHTS), weights_sha)})
        _write_manifest(tmp, manifest)
        check_replaceable(out_dir)        # again: it may have changed during the build
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --- reading ---------------------------------------------------------------------------------

def _is(value, types) -> bool:
    """isinstance, where an int is never a bool."""
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        return False
    return isinstance(value, types)


def _field(obj: dict, key: str, types, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ArtifactError(f"{MANIFEST}: {where}{key} is missing")
    value = obj[key]
    if not _is(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ArtifactError(f"{MANIFEST}: {where}{key} must be {names.replace('NoneType', 'null')}"
                            f", got {json.dumps(value)[:80]}")
    return value


def _plain_name(name, what: str) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name \
            or "\\" in name or "\0" in name:
        raise ArtifactError(f"{MANIFEST}: {what} {name!r} is not a plain file name inside the "
                            "artifact")
    return name


def _check_fields(m: dict) -> None:
    """Every field the readers use has its type (a wrong one is named, never a KeyError)."""
    for key, types in [("entry", str), ("transform_params", (str, type(None))),
                       ("inputs", list), ("buckets", dict), ("target", dict),
                       ("arch", (dict, type(None))), ("weights", dict), ("files", dict)]:
        _field(m, key, types, "")
    if "checked_inputs" in m:
        _field(m, "checked_inputs", bool, "")
    target = m["target"]
    _field(_field(target, "resolved", dict, "target."), "kind", str, "target.resolved.")
    requires = _field(target, "requires", dict, "target.")
    _field(requires, "device", str, "target.requires.")
    _field(requires, "device_type", int, "target.requires.")
    if "cpu_flags" in requires:
        flags = _field(requires, "cpu_flags", list, "target.requires.")
        if not all(isinstance(f, str) for f in flags):
            raise ArtifactError(f"{MANIFEST}: target.requires.cpu_flags must be strings")
    for key in ("machine", "cuda_arch"):
        if key in requires:
            _field(requires, key, str, "target.requires.")
    for b, name in m["buckets"].items():
        if not (b.isdigit() and 0 < int(b) <= MAX_BUCKET) or not isinstance(name, str):
            raise ArtifactError(f"{MANIFEST}: buckets must map batch sizes (1 to {MAX_BUCKET}) "
                                f"to entry names, got {b!r}: {name!r}")
    for k, spec in enumerate(m["inputs"]):
        _field(spec, "name", str, f"inputs[{k}].")
        _field(spec, "dtype", str, f"inputs[{k}].")
        _field(spec, "shape", list, f"inputs[{k}].")
    if m["arch"] is not None:
        arch = m["arch"]
        for key in ("embedding_sizes", "mlp_bot", "mlp_top"):
            values = _field(arch, key, list, "arch.")
            if not values or not all(_is(v, int) and v >= 1 for v in values):
                raise ArtifactError(f"{MANIFEST}: arch.{key} must be a list of positive "
                                    f"integers, got {json.dumps(values)[:80]}")
        _field(arch, "sparse_feature_size", int, "arch.")
    for name, entry in m["files"].items():
        _plain_name(name, "files entry")
        _field(entry, "sha256", str, f"files.{name}.")
        if _field(entry, "bytes", int, f"files.{name}.") < 0:
            raise ArtifactError(f"{MANIFEST}: files.{name}.bytes is negative")


def _check_weight_index(m: dict) -> None:
    """The weight index is exactly what ``_write_weights`` lays out: each tensor at the next
    aligned offset, its size its shape's, the file ending with the last one."""
    spec = m["weights"]
    wfile = _plain_name(_field(spec, "file", str, "weights."), "weights.file")
    if wfile not in m["files"]:
        raise ArtifactError(f"{MANIFEST}: weights.file {wfile!r} is not listed under files")
    pos = 0
    for k, t in enumerate(_field(spec, "tensors", list, "weights.")):
        where = f"weights.tensors[{k}]."
        name = _field(t, "name", str, where)
        shape = _field(t, "shape", list, where)
        if not all(_is(d, int) and d >= 0 for d in shape):
            raise ArtifactError(f"{MANIFEST}: {name}: shape {shape} is not a list of sizes")
        try:
            dtype = np.dtype(_field(t, "dtype", str, where))
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "fiub" or dtype.itemsize == 0:
            raise ArtifactError(f"{MANIFEST}: {name}: unknown dtype {t['dtype']!r}")
        pos += (-pos) % ALIGN
        offset, nbytes = _field(t, "offset", int, where), _field(t, "nbytes", int, where)
        if offset != pos:
            raise ArtifactError(f"{MANIFEST}: {name} is at offset {offset} of {wfile}; the "
                                f"layout puts it at {pos} (a tampered or corrupt index)")
        if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ArtifactError(f"{MANIFEST}: {name} has {nbytes} bytes, its shape {shape} and "
                                f"dtype {dtype} need {int(np.prod(shape)) * dtype.itemsize}")
        pos += nbytes
    if pos != m["files"][wfile]["bytes"]:
        raise ArtifactError(f"{MANIFEST}: the weight index covers {pos} bytes, {wfile} is "
                            f"listed with {m['files'][wfile]['bytes']}")


def read_manifest(artifact_dir: str, verify: bool = True, files: bool = True) -> Manifest:
    """Read and check the manifest (see the module docstring); with ``verify`` also every
    file's sha256. Never returns a manifest a reader could trip over. ``files=False`` leaves
    the files themselves unchecked (``replace_weights`` of a shipped-without-weights copy)."""
    path = os.path.join(artifact_dir, MANIFEST)
    if not os.path.isdir(artifact_dir):
        raise ArtifactError(f"artifact directory {artifact_dir!r} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise ArtifactError(f"{artifact_dir!r} is not a dlrmc artifact: {MANIFEST} is missing") from None
    except (ValueError, RecursionError) as e:      # RecursionError: nested absurdly deep
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a dlrmc artifact manifest")
    version = manifest.get("format_version")
    if not _is(version, int) or version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {json.dumps(version)}; this dlrmc reads "
                            f"version {FORMAT_VERSION}: recompile the model with this dlrmc")
    try:
        with open(os.path.join(artifact_dir, MANIFEST_DIGEST)) as f:
            recorded = f.read().split()
    except FileNotFoundError:
        raise ArtifactError(f"{artifact_dir}: {MANIFEST_DIGEST} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{artifact_dir}: cannot read {MANIFEST_DIGEST}: {e}") from None
    if recorded[:1] != [hashlib.sha256(raw).hexdigest()]:
        raise ArtifactError(f"{path} does not match {MANIFEST_DIGEST}: the manifest was "
                            "changed or damaged after it was written")
    _check_fields(manifest)
    if LIBRARY not in manifest["files"]:
        raise ArtifactError(f"{MANIFEST}: files does not list {LIBRARY}")
    _check_weight_index(manifest)
    for name, entry in (manifest["files"].items() if files else ()):
        fpath = os.path.join(artifact_dir, name)
        if os.path.islink(fpath):
            raise ArtifactError(f"artifact file {fpath} is a symbolic link; artifacts hold "
                                "plain files")
        if not os.path.isfile(fpath):
            raise ArtifactError(f"artifact file {fpath} is missing")
        size = os.path.getsize(fpath)
        if size != entry["bytes"]:
            raise ArtifactError(f"artifact file {fpath} is {size} bytes, the manifest says "
                                f"{entry['bytes']} (truncated or corrupt)")
        if verify and _sha256(fpath) != entry["sha256"]:
            raise ArtifactError(f"artifact file {fpath} is corrupt (sha256 mismatch)")
    return Manifest.from_json(manifest)


def read_weights(artifact_dir: str, manifest: Manifest, copy: bool = False) -> list[np.ndarray]:
    """The weights, in ``main``'s order, as views of one mapping of the weights file (each on
    a 64-byte boundary); ``manifest`` as ``read_manifest`` returned it (index and size already
    checked). The file is mapped copy-on-write, or with ``copy`` read into private memory
    (the artifact's files may then change or go).

    A table lookup is a random read, and with 4 KB pages each one also misses the TLB and walks
    page tables larger than the caches, so the weights are kept in 2 MB pages where the
    kernel gives them: the copy's memory is advised huge pages (``MADV_HUGEPAGE``); a file
    mapping gets them where the page cache holds the file in 2 MB folios (Linux 6.x on ext4
    or xfs after a sequential read, such as ``read_manifest``'s digest check, but not after
    random page-ins). The file mapping is advised
    ``MADV_RANDOM``: a lookup that misses the page cache reads one page from disk, not the
    kernel's read-around window it would mostly waste."""
    spec = manifest.weights
    path = os.path.join(artifact_dir, spec["file"])
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        whole = _map_weights(f, size, copy) if size else b""
    data = np.frombuffer(whole, np.uint8)
    out = []
    for t in spec["tensors"]:
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        if not t["nbytes"]:
            out.append(np.zeros(t["shape"], dtype))
            continue
        start = t["offset"]
        out.append(data[start:start + t["nbytes"]].view(dtype).reshape(t["shape"]))
    return out


def _map_weights(f, size: int, copy: bool) -> mmap.mmap:
    """``size`` bytes of the open file ``f`` mapped copy-on-write, or read into an anonymous
    private mapping; advised as ``read_weights`` says."""
    if not copy:
        whole = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        if hasattr(mmap, "MADV_RANDOM"):
            whole.madvise(mmap.MADV_RANDOM)
        return whole
    whole = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        whole.madvise(mmap.MADV_HUGEPAGE)
    view, done = memoryview(whole), 0
    while done < size:
        n = f.readinto(view[done:])
        if not n:
            raise ArtifactError(f"{f.name} ended at byte {done} of {size} while read")
        done += n
    view.release()
    return whole


def replace_weights(artifact_dir: str, weights: dict, shipped_without: bool = False) -> Manifest:
    """Write new values for every weight of an artifact (same names, dtypes and shapes as
    its manifest lists; a retrained model, or weights made where the artifact is deployed),
    replacing the artifact directory atomically (the library is hard-linked, not copied).
    ``shipped_without``: the weights file was left empty on purpose (made where it runs)."""
    artifact_dir = os.path.abspath(artifact_dir)
    manifest = read_manifest(artifact_dir, verify=False, files=not shipped_without)
    arrays = []
    for t in manifest.weights["tensors"]:
        if t["name"] not in weights:
            raise ArtifactError(f"no new value for weight {t['name']!r}")
        a = np.asarray(weights[t["name"]])
        if str(a.dtype) != t["dtype"] or list(a.shape) != t["shape"]:
            raise ArtifactError(f"weight {t['name']!r}: expected {t['dtype']} {t['shape']}, got "
                                f"{a.dtype} {list(a.shape)}")
        arrays.append((t["name"], a))
    tmp = staging_dir(artifact_dir)
    try:
        wfile = manifest.weights["file"]
        for name in manifest.files:
            if name != wfile:
                os.link(os.path.join(artifact_dir, name), os.path.join(tmp, name))
        index, digest = _write_weights(os.path.join(tmp, wfile), arrays)
        manifest.weights["tensors"] = index
        manifest.files[wfile] = _file_entry(os.path.join(tmp, wfile), digest)
        _write_manifest(tmp, manifest)
        replace_dir(tmp, artifact_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
