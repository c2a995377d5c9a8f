"""runtime/_fill.c: a bucket's input buffers filled from each layout ``predict`` takes, against
buffers built here bag by bag; and every batch that is not the plain case declined (the
Python checks then run, and name what is wrong: tests/test_runtime.py runs those both ways)."""

from __future__ import annotations

import numpy as np
import pytest

from dlrmc.runtime.model import BucketInputs, native_fill

pytestmark = pytest.mark.skipif(native_fill is None, reason="runtime/_fill.c not built")


def _batch(rng, tables, rows, features, max_bag):
    """dense [rows, F] and each table's bags (lists of index arrays)."""
    dense = rng.standard_normal((rows, features)).astype(np.float32)
    bags = [[rng.integers(0, 1000, rng.integers(0, max_bag + 1)) for _ in range(rows)]
            for _ in range(tables)]
    return dense, bags


def _layouts(dense, bags, dtypes):
    """The batch in the three layouts: reference (lS_o, lS_i), jagged, kjt."""
    o_t, i_t = dtypes
    starts = [np.cumsum([0] + [len(b) for b in table[:-1]]) for table in bags]
    per_table = [np.concatenate(table).astype(i_t) for table in bags]
    flat = np.concatenate(per_table)
    lengths = np.array([len(b) for table in bags for b in table], o_t)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(o_t)
    return {"reference": (dense, np.array(starts, o_t), per_table),
            "jagged": (dense, flat, offsets),
            "kjt": (dense, flat, lengths)}


def _expected(dense, bags, size):
    """The buffers as the compiled entry for ``size`` reads them: rows past the batch zero
    features and empty bags, every table's bags at its own stretch of the indices."""
    rows, features = dense.shape
    want_dense = np.zeros((size, features), np.float32)
    want_dense[:rows] = dense
    offsets, pos = [], 0
    for table in bags:
        for r in range(size):
            offsets.append(pos)
            pos += len(table[r]) if r < rows else 0
    offsets.append(pos)
    indices = np.concatenate([np.concatenate(t) for t in bags]).astype(np.int64)
    return want_dense, np.array(offsets, np.int64), indices


def _check(inputs, layout, args, dense, bags):
    tensors = inputs.fill_native(layout, *args)
    assert tensors is not None, f"{layout} declined a plain batch"
    want_dense, want_offsets, want_indices = _expected(dense, bags, inputs.size)
    got = [np.from_dlpack(t) for t in tensors]
    np.testing.assert_array_equal(got[0], want_dense)
    np.testing.assert_array_equal(got[1], want_indices)
    np.testing.assert_array_equal(got[2], want_offsets)


@pytest.mark.parametrize("dtypes", [(np.int64, np.int64), (np.int32, np.int64),
                                    (np.int64, np.int32), (np.int32, np.int32)],
                         ids=lambda d: f"{np.dtype(d[0]).name}-{np.dtype(d[1]).name}")
def test_every_layout_fills_the_buffers_bag_by_bag(dtypes):
    """Tables 1-5, buckets 1-16, every batch size up to the bucket's (padded), bags of 0-40
    indices (the index buffer grows from 64), on the same buffers call after call."""
    rng = np.random.default_rng(1)
    for tables in (1, 3, 5):
        for size in (1, 4, 16):
            features = int(rng.integers(1, 14))
            inputs = BucketInputs(size, features, tables)
            for rows in sorted({1, size, int(rng.integers(1, size + 1))}):
                for max_bag in (0, 1, 3, 40):
                    dense, bags = _batch(rng, tables, rows, features, max_bag)
                    for layout, args in _layouts(dense, bags, dtypes).items():
                        _check(inputs, layout, args, dense, bags)
                    if len({len(np.concatenate(t)) for t in bags}) == 1:
                        # equal index counts: lS_i as one [T, N] array, and as a tuple
                        d, starts, per_table = _layouts(dense, bags, dtypes)["reference"]
                        _check(inputs, "reference", (d, starts, np.stack(per_table)), dense,
                               bags)
                        _check(inputs, "reference", (d, starts, tuple(per_table)), dense,
                               bags)


def _declined():
    """(name, layout, args) of batches that are not the plain case, for a bucket of 4 rows,
    3 tables and 2 features; each from the same good batch of 3 rows."""
    rng = np.random.default_rng(2)
    dense, bags = _batch(rng, 3, 3, 2, 2)
    bags[0][0], bags[2][1] = np.array([1]), np.array([7, 8])   # tables 1 and 2 start past 0
    ref = _layouts(dense, bags, (np.int64, np.int64))["reference"]
    jag = _layouts(dense, bags, (np.int64, np.int64))["jagged"]
    kjt = _layouts(dense, bags, (np.int64, np.int64))["kjt"]
    d, starts, per_table = ref
    wide = np.ascontiguousarray(np.repeat(d, 2, axis=1))
    big = np.iinfo(np.int64).max
    cases = {
        "dense float64": (d.astype(np.float64), starts, per_table),
        "dense strided": (wide[:, ::2], starts, per_table),
        "dense Fortran order": (np.asfortranarray(d), starts, per_table),
        "dense big-endian": (d.astype(">f4"), starts, per_table),
        "dense width": (d[:, :1], starts, per_table),
        "dense 1-D": (d[0], starts[:, :1], per_table),
        "dense a list": (d.tolist(), starts, per_table),
        "no rows": (d[:0], starts[:, :0], per_table),
        "more rows than the bucket": (np.tile(d, (2, 1)), np.tile(starts, 2), per_table),
        "lS_o uint64": (d, starts.astype(np.uint64), per_table),
        "lS_o int16": (d, starts.astype(np.int16), per_table),
        "lS_o float": (d, starts.astype(np.float32), per_table),
        "lS_o a list": (d, starts.tolist(), per_table),
        "lS_o shape": (d, starts[:2], per_table),
        "lS_o first bag": (d, starts + 1, per_table),
        "lS_o overflows": (d, np.array([starts[0], starts[1], [0, big, big]]), per_table),
        "lS_i too few": (d, starts, per_table[:2]),
        "lS_i an array of an odd dtype": (d, starts, [per_table[0].astype(np.uint32),
                                                     *per_table[1:]]),
        "lS_i float": (d, starts, [per_table[0].astype(np.float64), *per_table[1:]]),
        "lS_i 2-D entry": (d, starts, [per_table[0][None], *per_table[1:]]),
        "lS_i a list entry": (d, starts, [per_table[0].tolist(), *per_table[1:]]),
        "lS_i strided entry": (d, starts, [np.repeat(per_table[0], 2)[::2], *per_table[1:]]),
        "lS_i a generator": (d, starts, (i for i in per_table)),
        "lS_i a [2, N] array": (d, starts, np.zeros((2, 4), np.int64)),
    }
    out = [(name, "reference", args) for name, args in cases.items()]
    dj, idx, off = jag
    out += [("jagged offsets length", "jagged", (dj, idx, off[:-1])),
            ("jagged offsets uint64", "jagged", (dj, idx, off.astype(np.uint64))),
            ("jagged indices 2-D", "jagged", (dj, idx[None], off)),
            ("jagged dense NaN", "jagged", (np.where(dj > 0, np.nan, dj), idx, off))]
    dk, vals, lens = kjt
    out += [("kjt lengths length", "kjt", (dk, vals, lens[1:])),
            ("kjt lengths overflow", "kjt", (dk, vals, np.array([big, big] + [0] * 7))),
            ("kjt values float", "kjt", (dk, vals.astype(np.float32), lens)),
            ("kjt dense inf", "kjt", (np.where(dk > 0, np.inf, dk), vals, lens))]
    return out


@pytest.mark.parametrize("name,layout,args", _declined(), ids=[c[0] for c in _declined()])
def test_anything_but_the_plain_case_is_declined(name, layout, args):
    inputs = BucketInputs(4, 2, 3)
    assert inputs.fill_native(layout, *args) is None


def test_a_wrong_argument_count_is_a_type_error():
    with pytest.raises(TypeError, match="takes 6 arguments"):
        native_fill.reference(1, 2, 3)
