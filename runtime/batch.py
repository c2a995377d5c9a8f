"""Batches from files and synthetic ones (numpy only), for ``dlrm-run`` and checks."""

from __future__ import annotations

import argparse
import contextlib
import os

import numpy as np

from ..frontend.arch import PRESET_BAGS
from ..frontend.dataset import NPZ_ERRORS
from ..frontend.ops import flat_layout
from .validate import NAMED_LAYOUTS, InputError, check_batch, check_named


DISTRIBUTIONS = ("uniform", "zipf")


def random_batch(arch: dict, batch: int, bag_size: int | tuple = 1, seed: int = 0,
                 empty_bags: float = 0.0, fixed: bool = True, distribution: str = "uniform",
                 zipf_alpha: float = 1.05):
    """dense_x [B, D] float32, lS_o [T, B] int64, lS_i list of T int64 arrays.

    The reference's random input mode: each bag holds ``bag_size`` indices (its
    ``--num-indices-per-lookup``; or one size per table, as MLPerf DLRM-v2's multi-hot
    features have) when ``fixed`` (``--num-indices-per-lookup-fixed``), else
    between 1 and ``bag_size``; a fraction ``empty_bags`` holds none. Indices are uniform over
    the table, or ``zipf``: row ranks from a Zipf law of exponent ``zipf_alpha`` (a few hot
    rows), scattered over the table by a fixed multiplicative hash.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"index distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    rows = arch["embedding_sizes"]
    sizes_per_table = tuple(bag_size) if isinstance(bag_size, (tuple, list)) else \
        (bag_size,) * len(rows)
    if len(sizes_per_table) != len(rows) or min(sizes_per_table) < 1:
        raise ValueError(f"indices per lookup must be positive, one number or one per table "
                         f"({len(rows)}), got {bag_size}")
    rng = np.random.default_rng(seed)
    dense = rng.random((batch, arch["mlp_bot"][0]), dtype=np.float32)
    offsets, indices = [], []
    for t, (n, size) in enumerate(zip(rows, sizes_per_table)):
        sizes = (np.full(batch, size, np.int64) if fixed
                 else rng.integers(1, size + 1, batch))
        if empty_bags:
            sizes[rng.random(batch) < empty_bags] = 0
        offsets.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        count = int(sizes.sum())
        if distribution == "uniform":
            indices.append(rng.integers(0, n, count, dtype=np.int64))
        else:
            ranks = (rng.zipf(zipf_alpha, count) - 1) % n
            indices.append((ranks * 2654435761 + 97 * t) % n)
    return dense, np.stack(offsets).astype(np.int64), indices


def add_random_batch_args(parser) -> None:
    """The reference's random-input flags (dlrm-run --random, dlrm-bench)."""
    parser.add_argument("--num-indices-per-lookup", "--bag-size", dest="bag_size",
                        type=_bag_sizes, default=None,
                        help="indices per bag: N, or one per table dash-separated (default: "
                             "the preset's, MLPerf's multi-hot sizes for dlrm-v2, else 1)")
    parser.add_argument("--num-indices-per-lookup-fixed", dest="fixed_bags",
                        action=argparse.BooleanOptionalAction, default=True,
                        help="every bag holds exactly that many (default); --no-... draws "
                             "1..N per bag, as the reference does without the flag")
    parser.add_argument("--index-distribution", choices=DISTRIBUTIONS, default="uniform")
    parser.add_argument("--zipf-alpha", type=float, default=1.05,
                        help="Zipf exponent for --index-distribution zipf")


def _bag_sizes(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N1-N2-... per table, got {text!r}") \
            from None
    return values[0] if len(values) == 1 else values


def bag_sizes_of(args) -> int | tuple[int, ...]:
    """The bag size(s) the flags ask for: --num-indices-per-lookup, else the preset's."""
    if args.bag_size is not None:
        return args.bag_size
    return PRESET_BAGS.get(getattr(args, "preset", None), 1)


def batch_from_args(arch: dict, batch: int, args, seed: int):
    return random_batch(arch, batch, bag_sizes_of(args), seed, fixed=args.fixed_bags,
                        distribution=args.index_distribution, zipf_alpha=args.zipf_alpha)


LAYOUTS = ("flat", "kjt", "reference")


def write_raw_batch(directory: str, batch, layout: str = "flat") -> None:
    """A reference-layout batch (dense_x, lS_o, lS_i) as the C++ runner (``dlrmc_run``)
    reads it: raw little-endian dense_x.bin (float32 [B, D]) and the sparse features as
    ``layout`` says: indices.bin + offsets.bin (flat), values.bin + lengths.bin (kjt) or
    lS_o.bin + lS_i_0.bin .. (reference), all int64."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dense, lS_o, lS_i = batch
    os.makedirs(directory, exist_ok=True)
    arrays = {"dense_x": np.asarray(dense, "<f4")}
    if layout == "reference":
        arrays["lS_o"] = lS_o
        arrays.update((f"lS_i_{k}", idx) for k, idx in enumerate(lS_i))
    else:
        indices, offsets = flat_layout(lS_o, lS_i)
        names = ("indices", "offsets") if layout == "flat" else ("values", "lengths")
        arrays.update(zip(names, (indices, offsets if layout == "flat" else np.diff(offsets))))
    for name, a in arrays.items():
        np.asarray(a, "<f4" if name == "dense_x" else "<i8").tofile(
            os.path.join(directory, f"{name}.bin"))


@contextlib.contextmanager
def read_npz(path: str):
    """``np.load`` of an .npz (no pickles); one cut short or damaged is an ``InputError``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            yield z
    except NPZ_ERRORS as e:
        raise InputError(f"{path} is not a readable .npz ({e})") from None


def load_npz(path: str, arch: dict):
    """A batch from an .npz holding dense_x and the sparse features in one of three layouts:
    the reference's (lS_o [T, B], and lS_i [T, N] or lS_i_0 .. lS_i_{T-1}), FBGEMM's flat one
    (indices, offsets [T*B+1]) or TorchRec's KeyedJaggedTensor one (values, lengths [T*B]).
    Returned validated, in the artifact's flat layout (``dlrmc.runtime.validate``)."""
    num_tables = len(arch["embedding_sizes"])
    with read_npz(path) as z:
        keys = set(z.files)
        for layout in NAMED_LAYOUTS:
            if "dense_x" in keys and set(layout) <= keys:
                return check_named(arch, {k: z[k] for k in ("dense_x", *layout)})
        missing = {"dense_x", "lS_o"} - keys
        if missing:
            hint = ("; it is a processed Criteo file (dlrm-data criteo): score it with dlrm-eval "
                    "ARTIFACT --data FILE" if {"X_int", "X_cat", "y"} <= keys else "")
            raise ValueError(f"{path} lacks {', '.join(sorted(missing))}{hint}")
        if "lS_i" in keys:
            lS_i = z["lS_i"]
        else:
            names = [f"lS_i_{k}" for k in range(num_tables)]
            absent = [n for n in names if n not in keys]
            if absent:
                raise ValueError(f"{path} has neither lS_i nor {', '.join(absent)}")
            lS_i = [z[n] for n in names]
        return check_batch(arch, z["dense_x"], z["lS_o"], lS_i)
