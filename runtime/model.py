"""Loading an artifact and running batches on it with the TVM runtime (no torch, no compiler)."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from typing import Callable

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from ..artifact import LIBRARY, ArtifactError, Manifest, read_manifest, read_weights
from ..frontend.arch import Arch
from ..frontend.ops import BAD_FLAT_INPUT
from .devices import artifact_device, is_host
from .plan import pick, slice_batch
from .validate import (InputError, check_batch, check_jagged, check_kjt, flat_jagged, flat_kjt,
                       flat_reference, joined)

try:
    from . import _fill as native_fill       # runtime/_fill.c, built by pip install (setup.py)
except ImportError:                          # built without a C compiler: numpy fills instead
    native_fill = None


def to_tvm(arrays: list[np.ndarray]) -> list[tvm.runtime.Tensor]:
    """Hand arrays to TVM in one copy: into a single buffer with each array on a 64-byte
    boundary, which TVM then takes zero-copy through DLPack. (tvm.runtime.tensor's Python
    path costs more than the model itself at batch 1.)"""
    sizes = [-(-a.nbytes // 64) * 64 or 64 for a in arrays]
    buf = np.empty(sum(sizes) + 64, np.uint8)
    pos = -buf.ctypes.data % 64
    out = []
    for a, n in zip(arrays, sizes):
        if a.size == 0:  # numpy gives empty views no usable address
            out.append(tvm.runtime.empty(a.shape, str(a.dtype)))
            continue
        view = buf[pos:pos + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        out.append(tvm.runtime.from_dlpack(view))
        pos += n
    return out


class BucketInputs:
    """One thread's input tensors for one batch bucket, written in place by each call: a
    call at a bucket allocates nothing and hands nothing over through DLPack. A batch of
    fewer rows is padded as ``plan`` pads (zero features, empty bags); the indices live in
    a buffer that grows to the largest batch seen, passed as a view of the batch's length."""

    MAX_VIEWS = 64     # index-count views kept (each a few hundred bytes)

    def __init__(self, size: int, features: int, tables: int):
        self.size, self.tables = size, tables
        self.dense = tvm.runtime.empty((size, features), "float32")
        self.offsets = tvm.runtime.empty((tables * size + 1,), "int64")
        self._dense, self._offsets = np.from_dlpack(self.dense), np.from_dlpack(self.offsets)
        self._grow(max(tables * size, 64))          # one index a bag, to start

    def _grow(self, count: int) -> None:
        self.indices = tvm.runtime.empty((count,), "int64")
        self._indices, self._views = np.from_dlpack(self.indices), {}

    def fill(self, dense: np.ndarray, indices, offsets: np.ndarray) -> list:
        """The entry's inputs holding this flat batch (any integer types; values unchecked:
        the compiled code checks them); ``indices`` one array, or the tables' arrays in
        order (``validate.flat_reference``), concatenated straight into the buffer."""
        whole = isinstance(indices, np.ndarray)
        count = len(indices) if whole else sum(map(len, indices))
        rows, size = dense.shape[0], self.size
        self._dense[:rows] = dense
        if rows == size:
            self._offsets[:] = offsets
        else:
            self._dense[rows:] = 0
            bags = self._offsets[:-1].reshape(self.tables, size)
            bags[:, :rows] = offsets[:-1].reshape(self.tables, rows)
            bags[:, rows:] = offsets[rows::rows, None]      # each table's end: empty bags
            self._offsets[-1] = offsets[-1]
        if count > len(self._indices):
            self._grow(max(count, 2 * len(self._indices)))
        if whole:
            self._indices[:count] = indices
        else:
            np.concatenate(indices, out=self._indices[:count], casting="unsafe")
        return self._tensors(count)

    def fill_native(self, layout: str, dense, sparse, more) -> list | None:
        """``fill`` from a batch as the caller gave it, in ``layout`` ("reference", "jagged"
        or "kjt"), by ``runtime/_fill.c``: the cheap checks and the copy in one native call.
        None where the batch is not the plain case (the Python checks then run)."""
        fill = getattr(native_fill, layout)
        count = fill(dense, sparse, more, self._dense, self._indices, self._offsets)
        if count > len(self._indices):
            self._grow(max(count, 2 * len(self._indices)))
            count = fill(dense, sparse, more, self._dense, self._indices, self._offsets)
        return self._tensors(count) if count >= 0 else None

    def _tensors(self, count: int) -> list:
        """The entry's inputs, the indices a view of the buffer's first ``count``."""
        view = self._views.get(count)
        if view is None:
            if len(self._views) >= self.MAX_VIEWS:
                self._views.clear()
            view = self._views[count] = self.indices._create_view((count,))
        return [self.dense, view, self.offsets]


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, float32 (computed in float64: no overflow warnings)."""
    return (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def time_calls(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` worker threads for TVM's parallel loops (default: TVM_NUM_THREADS, else
    every CPU this process may run on). TVM's own default ignores half the cores on x86,
    assuming they are hyper-threads."""
    what = "threads"
    if threads is None:
        env = os.environ.get("TVM_NUM_THREADS")
        if env:
            what, threads = "TVM_NUM_THREADS", int(env) if env.lstrip("-").isdigit() else env
        else:
            threads = len(os.sched_getaffinity(0))
    # (TVM's thread pool takes a negative count and then frees memory twice: a native crash)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"{what} must be a positive integer, got {threads!r}")
    cpus = sorted(os.sched_getaffinity(0))
    tvm.get_global_func("runtime.config_threadpool")(-3, int(threads), [str(c) for c in cpus])
    return tvm.runtime.num_threads()


def load_library(path: str) -> tvm.runtime.Module:
    """The artifact's compiled library (checked by ``read_manifest`` first: a truncated file
    must never reach the loader, which would die of SIGBUS)."""
    try:
        return tvm.runtime.load_module(os.path.join(path, LIBRARY))
    except Exception as e:  # noqa: BLE001 - dlopen failures surface as many types
        raise ArtifactError(f"cannot load {os.path.join(path, LIBRARY)}: {e}") from None


def vm_function(vm: VirtualMachine, name, field: str):
    """The VM function a manifest field names; an ``ArtifactError`` naming the field if the
    library has none of that name."""
    try:
        return vm[name]
    except (AttributeError, ValueError, TypeError):
        raise ArtifactError(f"manifest.json: {field} {json.dumps(name)} is not a function of "
                            f"{LIBRARY}") from None


def check_weights(manifest: Manifest) -> Arch:
    """The weight index against the manifest's architecture: exactly the model's weights,
    each of its dtype (float32; a table may be uint8, row-wise quantised), every table with
    the rows the architecture (and so input validation) assumes, every float32 weight of its
    shape. (A manifest whose ``arch`` says a table is larger than it
    is would let out-of-range indices through to the gathers.) Returns the architecture."""
    try:
        arch = Arch.from_dict(manifest.arch)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"manifest.json: arch is not a valid DLRM architecture: {e}") from None
    want = arch.weight_shapes()
    have = {t["name"]: t for t in manifest.weights["tensors"]}
    odd = [n + (" missing" if n in want else " unexpected") for n in sorted(set(want) ^ set(have))]
    if odd:
        raise ArtifactError(f"manifest.json: the weights do not match arch: {', '.join(odd[:6])}")
    for name, shape in want.items():
        got = have[name]
        table = name.startswith("emb_l.")
        dtypes = ("float32", "uint8") if table else ("float32",)   # uint8: quantised rows
        if got["dtype"] not in dtypes or (table and got["shape"][:1] != [shape[0]]) or (
                got["dtype"] == "float32" and tuple(got["shape"]) != shape):
            raise ArtifactError(f"manifest.json: weight {name} is {got['dtype']} {got['shape']}; "
                                f"arch says {' or '.join(dtypes)} {list(shape)}")
    return arch


class CompiledDLRM:
    """A loaded artifact. ``predict(dense_x, lS_o, lS_i)`` -> click probabilities [B, 1].

    ``predict`` may be called from many threads at once: each thread runs its own Relax VM
    over the one library and the one copy of the weights (a VM keeps per-call state, its
    registers and frames, so one VM cannot serve two calls at a time).
    """

    def __init__(self, artifact_dir: str, verify: bool = True, mmap: bool = False,
                 threads: int | None = None, manifest: Manifest | None = None):
        self.path = os.fspath(artifact_dir)
        self.threads = set_threads(threads)
        self.manifest = manifest or read_manifest(self.path, verify=verify)   # (load read it)
        self.arch = self.manifest.arch
        if self.arch is None:
            raise ArtifactError(f"{self.path} is a generic (non-DLRM) artifact: load it with "
                                "dlrmc.runtime.load, which gives a GenericModel")
        self._output = check_weights(self.manifest).output   # probabilities, or logits
        self.device = artifact_device(self.path, self.manifest)
        self._library = load_library(self.path)
        self._bucket_sizes = [int(b) for b in self.manifest.buckets]
        self._plans: dict[int, list] = {}
        self._local = threading.local()
        vm = self._vm()
        # mmap: TVM reads the file's pages in place (fast load, memory shared between
        # processes, first touches fault pages in); else the weights are read into private
        # memory at load. Either way in huge pages where the kernel gives them (read_weights).
        self._on_host = is_host(self.device)
        # the compiled code checks indices and offsets: predict leaves them to it
        self._checked = bool(self.manifest.checked_inputs) and self._on_host
        weights = [tvm.runtime.from_dlpack(w) if self._on_host
                   else tvm.runtime.tensor(w, self.device)
                   for w in read_weights(self.path, self.manifest,
                                         copy=self._on_host and not mmap)]
        self._weights = list(vm_function(vm, self.manifest.transform_params,
                                         "transform_params")(weights))
        self._check_entries()

    def _check_entries(self) -> None:
        """Run every entry once on an empty batch (zero features, empty bags: no table row
        read) of the size it is for: a manifest whose bucket or entry names another function
        is refused here, naming the field, not answered with the VM's shape error at a
        caller's first batch. It also warms each entry (its first call pays the page faults
        of its code and the VM's first allocations)."""
        any_batch = next(b for b in itertools.count(2) if b not in self._bucket_sizes)
        # (field, the function it names, its _entry key, the batch it runs)
        checks = [(f"buckets.{b}", name, int(b), int(b))
                  for b, name in self.manifest.buckets.items()]
        checks.append(("entry", self.manifest.entry, 0, any_batch))
        tables, features = self.num_tables, self.arch["mlp_bot"][0]
        for field, name, entry, size in checks:
            args = self._to_device([np.zeros((size, features), np.float32),
                                    np.zeros(0, np.int64), np.zeros(tables * size + 1, np.int64)])
            try:
                out = self._entry(entry)(*args, *self._weights)
                shape = tuple(out.shape)
            except Exception as e:  # noqa: BLE001 - the VM reports a mismatch as many types
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ArtifactError(f"manifest.json: {field} {json.dumps(name)} does not run a "
                                    f"batch of {size}: {why}") from None
            if shape != (size, 1):
                raise ArtifactError(f"manifest.json: {field} {json.dumps(name)} gave shape "
                                    f"{list(shape)} for a batch of {size}, not [{size}, 1]")

    def _vm(self) -> VirtualMachine:
        """This thread's VM; its entries are cached beside it."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            set_threads(self.threads)      # TVM's worker pool is per calling thread
            vm = VirtualMachine(self._library, self.device)
            self._local.main = vm_function(vm, self.manifest.entry, "entry")
            self._local.buckets = {int(b): vm_function(vm, name, f"buckets.{b}")
                                   for b, name in self.manifest.buckets.items()}
            self._local.inputs = {}
            self._local.vm = vm
        return vm

    def _to_device(self, arrays: list[np.ndarray]) -> list:
        """Inputs for the entries: one host copy on the CPU; copies to the GPU otherwise."""
        if self._on_host:
            return to_tvm(arrays)
        return [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]

    def _entry(self, size: int):
        """This thread's entry for a static batch ``size``, or ``main`` for 0."""
        self._vm()
        return self._local.buckets[size] if size else self._local.main

    @property
    def num_tables(self) -> int:
        return len(self.arch["embedding_sizes"])

    @property
    def buckets(self) -> list[int]:
        return sorted(self._bucket_sizes)

    def bind(self, dense_x, lS_o, lS_i) -> Callable[[], object]:
        """Validate a batch once and plan it over the entries (``dlrmc.runtime.plan``);
        return a call that runs it (what benchmarks time), giving a [B, 1] tensor or array."""
        return self._bind(*check_batch(self.arch, dense_x, lS_o, lS_i))

    def _bind(self, dense, indices, offsets) -> Callable[[], object]:
        """``bind`` for a batch already validated, in the artifact's flat layout."""
        batch = dense.shape[0]
        plan = self._plan(batch)
        if len(plan) == 1 and plan[0][1] in (0, batch):
            size = plan[0][1]
            args = self._to_device([dense, indices, offsets])
            return lambda: self._entry(size)(*args, *self._weights)
        calls, start = [], 0
        for rows, size in plan:
            piece = slice_batch(dense, indices, offsets, start, rows, size or rows)
            calls.append((size, rows, self._to_device(list(piece))))
            start += rows

        def run():
            outs = [self._entry(size)(*args, *self._weights).numpy()[:rows]
                    for size, rows, args in calls]
            return outs[0] if len(outs) == 1 else np.concatenate(outs)

        return run

    def predict(self, dense_x, lS_o, lS_i, logits: bool = False) -> np.ndarray:
        """Validate the batch (reference layout: ``lS_o`` [T, B] bag starts, ``lS_i`` T index
        arrays) and run it; returns float32 [B, 1] click probabilities, or with ``logits`` the
        model's logits (a model that ends in logits, as TorchRec's DLRM does)."""
        return self._predict("reference", (dense_x, lS_o, lS_i),
                             lambda: flat_reference(self.arch, dense_x, lS_o, lS_i),
                             lambda: check_batch(self.arch, dense_x, lS_o, lS_i), logits)

    def bind_jagged(self, dense_x, indices, offsets) -> Callable[[], object]:
        """``bind`` for the flat layout, as ``predict_jagged`` takes it."""
        return self._bind(*check_jagged(self.arch, dense_x, indices, offsets))

    def predict_jagged(self, dense_x, indices, offsets, logits: bool = False) -> np.ndarray:
        """``predict`` for FBGEMM's table-batched layout, the artifact's own: ``indices`` [N]
        (every table's, table-major), ``offsets`` [T*B+1]
        (``dlrmc.runtime.validate.check_jagged``)."""
        return self._predict("jagged", (dense_x, indices, offsets),
                             lambda: flat_jagged(self.arch, dense_x, indices, offsets),
                             lambda: check_jagged(self.arch, dense_x, indices, offsets), logits)

    def predict_kjt(self, dense_x, values, lengths, logits: bool = False) -> np.ndarray:
        """``predict`` for TorchRec's KeyedJaggedTensor layout: ``values`` [N] key-major,
        ``lengths`` [T*B] bag sizes (``dlrmc.runtime.validate.check_kjt``)."""
        return self._predict("kjt", (dense_x, values, lengths),
                             lambda: flat_kjt(self.arch, dense_x, values, lengths),
                             lambda: check_kjt(self.arch, dense_x, values, lengths), logits)

    def predict_batch(self, batch, logits: bool = False) -> np.ndarray:
        """``predict`` for a batch ``dlrmc.runtime.validate`` already checked, in the flat
        layout its checks return (what ``dlrm-serve`` runs, its requests merged by
        ``plan.merge_batches``)."""
        return self._predict("jagged", batch, lambda: batch, lambda: batch, logits)

    def _plan(self, batch: int) -> list[tuple[int, int]]:
        """``plan.pick`` for this artifact's buckets, remembered per batch size."""
        plan = self._plans.get(batch)
        if plan is None:
            plan = pick(batch, self._bucket_sizes)
            if len(self._plans) < 4096:
                self._plans[batch] = plan
        return plan

    def _predict(self, layout: str, args: tuple, cheap: Callable[[], tuple | None],
                 full: Callable[[], tuple], logits: bool) -> np.ndarray:
        """Run a batch given by ``args`` in ``layout`` and by its checks
        (``dlrmc.runtime.validate``): ``full`` checks it and returns it in the flat layout;
        ``cheap`` checks only what the compiled code does not (or returns None where it
        cannot tell cheaply). With an artifact that checks its inputs and a batch one entry
        runs, the batch goes into this thread's ``BucketInputs``, by ``runtime/_fill.c`` where
        it is the plain case, else after ``cheap``; if the compiled code refuses it, ``full``
        says why."""
        self.check_logits(logits)
        call = self._fill_native(layout, args) if self._checked else None
        if call is None and self._checked:
            try:
                call = self._fill(cheap())
            except InputError:
                raise
            except Exception:   # noqa: BLE001 - an odd input: the full checks name it
                call = None
        if call is None:
            return self._run(self._bind(*full()), logits)
        entry, tensors, rows = call
        try:
            out = entry(*tensors, *self._weights)
        except ValueError as e:
            if BAD_FLAT_INPUT not in str(e):
                raise
            full()      # raises the InputError that names the table and position
            raise InputError(f"the compiled model refused the batch ({BAD_FLAT_INPUT}), "
                             "though the runtime's checks pass it") from None
        return self.as_requested(np.from_dlpack(out)[:rows], logits)

    def _inputs(self, size: int) -> BucketInputs:
        """This thread's input tensors for bucket ``size``."""
        inputs = self._local.inputs.get(size)
        if inputs is None:
            inputs = self._local.inputs[size] = BucketInputs(size, self.arch["mlp_bot"][0],
                                                             self.num_tables)
        return inputs

    def _fill_native(self, layout: str, args: tuple):
        """(entry, its inputs, rows) for a batch one bucket runs, filled by
        ``runtime/_fill.c``; None where it declines the batch, or is not built."""
        dense = args[0]
        if native_fill is None or not isinstance(dense, np.ndarray) or dense.ndim != 2:
            return None
        rows = dense.shape[0]
        plan = self._plan(rows) if rows else ()
        if len(plan) != 1 or not plan[0][1]:
            return None
        size = plan[0][1]
        entry = self._entry(size)       # (first: it makes this thread's state)
        tensors = self._inputs(size).fill_native(layout, *args)
        return None if tensors is None else (entry, tensors, rows)

    def _fill(self, batch: tuple | None):
        """``_fill_native``'s result for a flat batch ``cheap`` passed, filled in numpy
        (``BucketInputs.fill``), or for a batch larger than every bucket (``main``) handed
        over in one copy; None for a batch split over several entries."""
        plan = self._plan(batch[0].shape[0]) if batch is not None else []
        if len(plan) != 1:
            return None
        dense, indices, offsets = batch
        size = plan[0][1]
        entry = self._entry(size)
        if size:
            tensors = self._inputs(size).fill(dense, indices, offsets)
        else:
            tensors = to_tvm([dense, joined(indices).astype(np.int64, copy=False),
                              offsets.astype(np.int64, copy=False)])
        return entry, tensors, dense.shape[0]

    def check_logits(self, logits: bool) -> None:
        """Refuse ``logits=True`` for a model that ends in a sigmoid."""
        if logits and self._output != "logit":
            raise InputError(f"{self.path} computes click probabilities (its model ends in a "
                             "sigmoid), not logits; call without logits=True")

    @property
    def output_kind(self) -> str:
        """What the model computes: "probability" or "logit" (TorchRec's DLRM)."""
        return self._output

    def _run(self, call, logits: bool = False) -> np.ndarray:
        """Run a bound call; the probabilities (or ``logits``) as numpy."""
        self.check_logits(logits)
        out = call()
        if isinstance(out, tvm.runtime.Tensor):
            # on the host, the VM's own output buffer, shared (it lives as long as the array)
            out = np.from_dlpack(out) if self._on_host else out.numpy()
        return self.as_requested(out, logits)

    def as_requested(self, raw: np.ndarray, logits: bool = False) -> np.ndarray:
        """The model's own output as the caller asked for it: logits as they are (with
        ``logits``), else click probabilities."""
        return raw if logits or self._output != "logit" else sigmoid(raw)

    def time_per_batch(self, dense_x, lS_o, lS_i, repeat: int = 20) -> list[float]:
        """Seconds of each of ``repeat`` runs after a warm-up, validation excluded."""
        return time_calls(self.bind(dense_x, lS_o, lS_i), warmup=1, repeat=repeat)


def load(artifact_dir: str, verify: bool = True, mmap: bool = False,
         threads: int | None = None):
    """Load an artifact directory; ``verify`` checks every file's sha256 first, ``mmap`` maps
    the weights from the file instead of copying them, ``threads`` sets TVM's worker threads
    (see ``set_threads``). A DLRM gives a ``CompiledDLRM``; a graph compiled through the
    generic ONNX path (``dlrmc.compiler.generic``) a ``GenericModel``."""
    manifest = read_manifest(os.fspath(artifact_dir), verify=verify)
    if manifest.arch is None:
        from .generic import GenericModel
        return GenericModel(artifact_dir, threads=threads, manifest=manifest)
    return CompiledDLRM(artifact_dir, mmap=mmap, threads=threads, manifest=manifest)
