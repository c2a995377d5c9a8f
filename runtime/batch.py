"""Batches from files and synthetic ones (numpy only), for ``dlrm-run`` and checks."""

from __future__ import annotations

import argparse
import os

import numpy as np

from ..frontend.ops import flat_layout
from .validate import check_batch, check_jagged, check_kjt


DISTRIBUTIONS = ("uniform", "zipf")


def random_batch(arch: dict, batch: int, bag_size: int = 1, seed: int = 0,
                 empty_bags: float = 0.0, fixed: bool = True, distribution: str = "uniform",
                 zipf_alpha: float = 1.05):
    """dense_x [B, D] float32, lS_o [T, B] int64, lS_i list of T int64 arrays.

    The reference's random input mode: each bag holds ``bag_size`` indices (its
    ``--num-indices-per-lookup``) when ``fixed`` (``--num-indices-per-lookup-fixed``), else
    between 1 and ``bag_size``; a fraction ``empty_bags`` holds none. Indices are uniform over
    the table, or ``zipf``: row ranks from a Zipf law of exponent ``zipf_alpha`` (a few hot
    rows), scattered over the table by a fixed multiplicative hash.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"index distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if bag_size < 1:
        raise ValueError(f"indices per lookup must be positive, got {bag_size}")
    rng = np.random.default_rng(seed)
    rows = arch["embedding_sizes"]
    dense = rng.random((batch, arch["mlp_bot"][0]), dtype=np.float32)
    offsets, indices = [], []
    for t, n in enumerate(rows):
        sizes = (np.full(batch, bag_size, np.int64) if fixed
                 else rng.integers(1, bag_size + 1, batch))
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
    parser.add_argument("--num-indices-per-lookup", "--bag-size", dest="bag_size", type=int,
                        default=1, help="indices per bag (default 1, one-hot)")
    parser.add_argument("--num-indices-per-lookup-fixed", dest="fixed_bags",
                        action=argparse.BooleanOptionalAction, default=True,
                        help="every bag holds exactly that many (default); --no-... draws "
                             "1..N per bag, as the reference does without the flag")
    parser.add_argument("--index-distribution", choices=DISTRIBUTIONS, default="uniform")
    parser.add_argument("--zipf-alpha", type=float, default=1.05,
                        help="Zipf exponent for --index-distribution zipf")


def batch_from_args(arch: dict, batch: int, args, seed: int):
    return random_batch(arch, batch, args.bag_size, seed, fixed=args.fixed_bags,
                        distribution=args.index_distribution, zipf_alpha=args.zipf_alpha)


LAYOUTS = ("flat", "kjt", "reference")


def write_raw_batch(directory: str, batch, layout: str = "flat") -> None:
    """A reference-layout batch (dense_x, lS_o, lS_i) as the C++ runner (``dlrmc_run``)
    reads it: raw little-endian dense_x.bin (float32 [B, D]) and the sparse features as
    ``layout`` says: indices.bin + offsets.bin (flat), values.bin + lengths.bin (kjt) or
    lS_o.bin + lS_i_0.bin .. (reference), all int64."""
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


def load_npz(path: str, arch: dict):
    """A batch from an .npz holding dense_x and the sparse features in one of three layouts:
    the reference's (lS_o [T, B], and lS_i [T, N] or lS_i_0 .. lS_i_{T-1}), FBGEMM's flat one
    (indices, offsets [T*B+1]) or TorchRec's KeyedJaggedTensor one (values, lengths [T*B]).
    Returned validated, in the artifact's flat layout (``dlrmc.runtime.validate``)."""
    num_tables = len(arch["embedding_sizes"])
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        for layout, check in ((("indices", "offsets"), check_jagged),
                              (("values", "lengths"), check_kjt)):
            if "dense_x" in keys and set(layout) <= keys:
                return check(arch, z["dense_x"], *(z[k] for k in layout))
        missing = {"dense_x", "lS_o"} - keys
        if missing:
            raise ValueError(f"{path} lacks {', '.join(sorted(missing))}")
        if "lS_i" in keys:
            lS_i = z["lS_i"]
        else:
            names = [f"lS_i_{k}" for k in range(num_tables)]
            absent = [n for n in names if n not in keys]
            if absent:
                raise ValueError(f"{path} has neither lS_i nor {', '.join(absent)}")
            lS_i = [z[n] for n in names]
        return check_batch(arch, z["dense_x"], z["lS_o"], lS_i)
