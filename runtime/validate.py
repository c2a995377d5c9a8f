"""Input checks: every batch is checked before a table row is read.

The full checks below run before native code for a CUDA artifact, an artifact written
before ``checked_inputs``, and a batch split over several entries; for the rest (CPU
artifacts, whose bag kernel checks the flat indices and offsets itself) ``predict`` runs the
cheap half at the end of this module, and the full checks only to name what the kernel
refused.

Each layout a caller may use (the reference's ``lS_o``/``lS_i``, FBGEMM's flat
``indices``/``offsets``, TorchRec's ``values``/``lengths``) is checked and returned as the
artifact's own input, the flat layout (``dlrmc.frontend.ops``): (dense float32 [B, F],
indices int64 [N], offsets int64 [T*B+1]). The checks are vectorised over all tables, a few
numpy calls per batch however many tables there are.

Everything is checked against the artifact's manifest: dtypes, ranks and shapes, offsets
(start at 0, non-decreasing, within the table's index count) and every index inside its
table, all compared as int64 (an unsigned value past int64's range is refused, never wrapped).
A bad index would make native code read arbitrary memory, so it is a ``ValueError`` naming
the table and position, never a crash or silent garbage.

Dense features must be finite: a NaN or inf is refused with its row and column. (PyTorch
would give NaN for such a row; the compiled ReLU, ``max(v, 0)``, would turn a NaN into a
confident prediction, so the batch is refused instead of answered wrongly.)
"""

from __future__ import annotations

import itertools

import numpy as np


class InputError(ValueError):
    """A batch that does not fit the artifact."""


_INT64_MAX = np.iinfo(np.int64).max
_FAST_INDEX_TYPES = (np.dtype(np.int64), np.dtype(np.int32))


def _int_array(value, what: str) -> np.ndarray:
    """``value`` as an int64 array; any integer dtype, an unsigned value above int64's range
    refused with its position."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":  # np.issubdtype costs more than the model at batch 1
        raise InputError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > _INT64_MAX:
        pos = np.unravel_index(int(np.argmax(arr > _INT64_MAX)), arr.shape)
        raise InputError(f"{what}[{', '.join(map(str, pos))}] = {arr[pos]} is beyond int64's range")
    return arr.astype(np.int64, copy=False)


def check_dense(arch: dict, dense_x) -> np.ndarray:
    """float32 [batch >= 1, num_dense], every value finite."""
    num_dense = arch["mlp_bot"][0]
    dense = np.asarray(dense_x)
    if dense.dtype != np.float32:
        raise InputError(f"dense_x must be float32, got {dense.dtype} (use .astype(np.float32))")
    if dense.ndim != 2 or dense.shape[1] != num_dense or dense.shape[0] < 1:
        raise InputError(f"dense_x must have shape [batch >= 1, {num_dense}], got "
                         f"{list(dense.shape)}")
    finite = np.isfinite(dense)
    if not finite.all():
        r, c = divmod(int(np.argmin(finite)), num_dense)
        raise InputError(f"dense_x[{r}, {c}] is {dense[r, c]}; dense features must be finite")
    return np.ascontiguousarray(dense)


def _out_of_range(rows, flat: np.ndarray, starts: np.ndarray) -> tuple[int, int] | None:
    """(position in ``flat``, table) of the first index outside its table, or None; ``flat``
    holds every table's indices, table k's from ``starts[k]`` to ``starts[k + 1]``. All tables
    at once: a per-table loop of numpy calls costs more than the model at batch 1."""
    # As unsigned, a negative index is huge: one comparison catches both ends.
    bad = flat.view(np.uint64) >= np.repeat(np.asarray(rows, np.uint64), np.diff(starts))
    if not bad.any():
        return None
    p = int(np.argmax(bad))
    return p, int(np.searchsorted(starts, p, side="right")) - 1


Batch = tuple[np.ndarray, np.ndarray, np.ndarray]   # dense_x, indices, offsets: flat


def check_batch(arch: dict, dense_x, lS_o, lS_i) -> Batch:
    """Validate a batch in the reference layout; return it in the flat one (one concatenate).

    ``lS_i`` is a list of T 1-D arrays or a [T, N] array.
    """
    rows = arch["embedding_sizes"]
    num_tables = len(rows)
    dense = check_dense(arch, dense_x)
    batch = dense.shape[0]
    offsets = _int_array(lS_o, "lS_o")
    if offsets.shape != (num_tables, batch):
        raise InputError(f"lS_o must have shape [{num_tables}, {batch}] (tables, batch), got "
                         f"{list(offsets.shape)}")
    if isinstance(lS_i, np.ndarray) and lS_i.ndim == 2:
        lS_i = list(lS_i)
    if isinstance(lS_i, np.ndarray) or not hasattr(lS_i, "__len__"):
        raise InputError("lS_i must be a list of 1-D index arrays, one per table, or a [T, N] array")
    if len(lS_i) != num_tables:
        raise InputError(f"lS_i has {len(lS_i)} index arrays, the model has {num_tables} tables")
    first = lS_i[0]
    if isinstance(first, np.ndarray) and first.dtype in _FAST_INDEX_TYPES and all(
            isinstance(i, np.ndarray) and i.dtype == first.dtype and i.ndim == 1 for i in lS_i):
        indices = lS_i        # signed arrays of one type: one concatenate checks them all
    else:
        indices = []
        for k, idx in enumerate(lS_i):
            idx = _int_array(idx, f"lS_i[{k}]")
            if idx.ndim != 1:
                raise InputError(f"lS_i[{k}] must be 1-D, got shape {list(idx.shape)}")
            indices.append(idx)
    lengths = np.array([len(i) for i in indices], np.int64)
    if (offsets[:, 0] != 0).any():
        k = int(np.argmax(offsets[:, 0] != 0))
        raise InputError(f"lS_o[{k}][0] is {offsets[k, 0]}; the first bag must start at 0")
    falling = offsets[:, 1:] < offsets[:, :-1]     # not np.diff: it overflows at the edges
    if falling.any():
        k, b = divmod(int(np.argmax(falling)), batch - 1)
        raise InputError(f"lS_o[{k}] decreases at position {b + 1} ({offsets[k, b]} -> "
                         f"{offsets[k, b + 1]}); offsets must be non-decreasing")
    past = offsets[:, -1] > lengths
    if past.any():
        k = int(np.argmax(past))
        raise InputError(f"lS_o[{k}][{batch - 1}] = {offsets[k, -1]} is past the end of lS_i[{k}] "
                         f"({lengths[k]} indices)")
    flat = np.concatenate(indices).astype(np.int64, copy=False)
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    bad = _out_of_range(rows, flat, starts)
    if bad:
        p, k = bad
        raise InputError(f"lS_i[{k}][{p - starts[k]}] = {flat[p]} is out of range for table {k} "
                         f"with {rows[k]} rows")
    return dense, flat, np.append((offsets + starts[:-1, None]).ravel(), starts[-1])


def check_jagged(arch: dict, dense_x, indices, offsets) -> Batch:
    """Validate a batch in the flat layout of FBGEMM's table-batched embedding bags:
    ``indices`` [N], every table's indices concatenated table-major, and ``offsets`` [T*B+1]
    (any integer types), ``offsets[t*B + b]`` the start of bag b of table t and the last entry
    N. Errors name the table and position. int64 arrays are returned as they came, not
    copied."""
    dense = check_dense(arch, dense_x)
    return _check_flat(arch, dense, _int_array(indices, "indices"), _int_array(offsets, "offsets"),
                       "indices")


def check_kjt(arch: dict, dense_x, values, lengths) -> Batch:
    """Validate a batch in TorchRec's KeyedJaggedTensor layout: ``values`` [N] key-major (every
    table's indices concatenated) and ``lengths`` [T*B], the bag sizes; as ``check_jagged``."""
    dense = check_dense(arch, dense_x)
    batch, num_tables = dense.shape[0], len(arch["embedding_sizes"])
    lens = _int_array(lengths, "lengths")
    if lens.shape != (num_tables * batch,):
        raise InputError(f"lengths must have shape [{num_tables * batch}] (tables x batch), got "
                         f"{list(lens.shape)}")
    negative = lens < 0
    if negative.any():
        p = int(np.argmax(negative))
        raise InputError(f"lengths[{p}] = {lens[p]} (table {p // batch}, bag {p % batch}) is "
                         "negative")
    vals = _int_array(values, "values")
    if vals.ndim == 1 and int(lens.sum()) != len(vals):
        raise InputError(f"lengths add up to {int(lens.sum())}, but values holds {len(vals)} "
                         "indices")
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lens)])
    return _check_flat(arch, dense, vals, offsets, "values")


def _check_flat(arch: dict, dense: np.ndarray, idx: np.ndarray, off: np.ndarray, idx_name: str
                ) -> Batch:
    """The checks of ``check_jagged`` on int64 arrays (``dense`` already checked);
    ``idx_name``: what the caller calls the indices."""
    rows = arch["embedding_sizes"]
    num_tables, batch = len(rows), dense.shape[0]
    if idx.ndim != 1:
        raise InputError(f"{idx_name} must be 1-D, got shape {list(idx.shape)}")
    if off.shape != (num_tables * batch + 1,):
        raise InputError(f"offsets must have shape [{num_tables * batch + 1}] (tables x batch "
                         f"+ 1), got {list(off.shape)}")
    if off[0] != 0:
        raise InputError(f"offsets[0] is {off[0]}; the first bag must start at 0")
    falling = off[1:] < off[:-1]
    if falling.any():
        p = int(np.argmax(falling)) + 1
        k, b = divmod(p, batch)
        raise InputError(f"offsets decreases at position {p} (table {k}, bag {b}: "
                         f"{off[p - 1]} -> {off[p]}); offsets must be non-decreasing")
    if off[-1] != len(idx):
        raise InputError(f"offsets[{num_tables * batch}] = {off[-1]}, but {idx_name} holds "
                         f"{len(idx)} values; the last offset is their count")
    starts = off[::batch]                       # where each table's indices begin, then N
    bad = _out_of_range(rows, idx, starts)
    if bad:
        p, k = bad
        raise InputError(f"{idx_name}[{p}] = {idx[p]} (table {k}, position {p - starts[k]}) is "
                         f"out of range for table {k} with {rows[k]} rows")
    return dense, np.ascontiguousarray(idx), np.ascontiguousarray(off)


# The cheap half, for an artifact whose compiled code checks its flat indices and offsets
# itself (``checked_inputs``): the dense features checked as above, the sparse inputs only
# their kinds and shapes, and the batch brought to the flat layout as it is. Each returns
# None where it cannot tell cheaply (then the full checks above run); the values of indices
# and offsets are left to the compiled code, and when it refuses a batch the full checks
# name what is wrong.

def _integers(*arrays) -> bool:
    return all(a.dtype.kind in "iu" for a in arrays)


def flat_jagged(arch: dict, dense_x, indices, offsets) -> Batch | None:
    """``check_jagged``'s cheap half."""
    dense = check_dense(arch, dense_x)
    idx, off = np.asarray(indices), np.asarray(offsets)
    rows = len(arch["embedding_sizes"]) * dense.shape[0] + 1
    if not _integers(idx, off) or idx.ndim != 1 or off.shape != (rows,):
        return None
    return dense, idx, off


def flat_kjt(arch: dict, dense_x, values, lengths) -> Batch | None:
    """``check_kjt``'s cheap half."""
    dense = check_dense(arch, dense_x)
    vals, lens = np.asarray(values), np.asarray(lengths)
    bags = len(arch["embedding_sizes"]) * dense.shape[0]
    if not _integers(vals, lens) or vals.ndim != 1 or lens.shape != (bags,):
        return None
    off = np.empty(bags + 1, np.int64)
    off[0] = 0
    np.cumsum(lens.astype(np.int64, copy=False), out=off[1:])
    return dense, vals, off


def joined(indices) -> np.ndarray:
    """The flat indices of a batch whose indices may be its tables' arrays (``flat_reference``;
    joined as int64, cast as ``BucketInputs.fill`` casts them)."""
    if isinstance(indices, np.ndarray):
        return indices
    return np.concatenate(indices, dtype=np.int64, casting="unsafe")


def flat_reference(arch: dict, dense_x, lS_o, lS_i) -> Batch | None:
    """``check_batch``'s cheap half (the first bag of each table must start at 0; the rest
    of the offsets are checked as the flat layout's). Python's own sums, not numpy's: at
    batch 1 numpy's fixed cost per call is most of this function's. Given one array per
    table, the indices come back as that tuple, unjoined (``joined``): ``BucketInputs``
    concatenates them straight into its buffer, one copy of them instead of two."""
    dense = check_dense(arch, dense_x)
    tables, batch = len(arch["embedding_sizes"]), dense.shape[0]
    starts = np.asarray(lS_o)
    if not _integers(starts) or starts.shape != (tables, batch) or np.count_nonzero(
            starts[:, 0]):
        return None
    if isinstance(lS_i, np.ndarray):
        if lS_i.ndim != 2 or not _integers(lS_i):
            return None
        lengths, idx = [lS_i.shape[1]] * len(lS_i), lS_i.ravel()
    else:    # (a list of anything but arrays raises here, and the full checks run)
        if not {(i.dtype.kind, i.ndim) for i in lS_i} <= {("i", 1), ("u", 1)}:
            return None
        lengths, idx = [len(i) for i in lS_i], tuple(lS_i)
    if len(lengths) != tables:
        return None
    first = list(itertools.accumulate(lengths, initial=0))   # where each table begins
    if batch == 1:          # every bag starts at 0: the offsets are where the tables begin
        return dense, idx, np.array(first, np.int64)
    off = np.empty(tables * batch + 1, np.int64)
    np.add(starts.astype(np.int64, copy=False), np.array(first[:-1], np.int64)[:, None],
           out=off[:-1].reshape(tables, batch))
    off[-1] = first[-1]
    return dense, idx, off


#: the sparse inputs of each named layout a server or file may carry beside ``dense_x``
NAMED_LAYOUTS = {("indices", "offsets"): check_jagged, ("values", "lengths"): check_kjt}


def check_named(arch: dict, arrays: dict) -> Batch:
    """Validate a batch given by name: ``dense_x`` with ``indices`` + ``offsets`` (flat) or
    ``values`` + ``lengths`` (KeyedJaggedTensor), nothing else."""
    names = set(arrays)
    for layout, check in NAMED_LAYOUTS.items():
        if names == {"dense_x", *layout}:
            return check(arch, *(arrays[n] for n in ("dense_x", *layout)))
    raise InputError("inputs must be dense_x with indices + offsets (FBGEMM's flat layout) or "
                     f"with values + lengths (KeyedJaggedTensor); got {', '.join(sorted(names))}")
