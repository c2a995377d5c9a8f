"""The runtime: torch-free and compiler-free deployment, input validation, artifact integrity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dlrmc.artifact import FORMAT_VERSION, ArtifactError
from dlrmc.runtime import InputError, load

from conftest import TINY, make_batch, rewrite_manifest, run, torch_predict


@pytest.fixture(params=["native", "numpy"])
def fill(request, monkeypatch):
    """A test of batches run both ways ``predict`` fills its buffers: by runtime/_fill.c,
    and in numpy (an install built without a C compiler)."""
    import dlrmc.runtime.model as model

    if request.param == "native":
        assert model.native_fill is not None, "runtime/_fill.c was not built (pip install)"
    else:
        monkeypatch.setattr(model, "native_fill", None)
    return request.param


def test_runs_without_torch_and_without_the_compiler(compiled, tmp_path):
    c = compiled(TINY)
    dense, offsets, indices = make_batch(TINY, 33, np.random.default_rng(7), max_bag=5)
    np.savez(tmp_path / "batch.npz", dense_x=dense, lS_o=offsets,
             **{f"lS_i_{k}": i for k, i in enumerate(indices)})
    np.save(tmp_path / "expected.npy", torch_predict(c.model, dense, offsets, indices))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # any import of torch now fails
        import numpy as np
        import dlrmc.runtime
        from dlrmc.runtime.batch import load_npz
        model = dlrmc.runtime.load({str(c.path)!r})
        got = model.predict_jagged(*load_npz({str(tmp_path / 'batch.npz')!r}, model.arch))
        np.testing.assert_allclose(got, np.load({str(tmp_path / 'expected.npy')!r}),
                                   rtol=1e-5, atol=2e-6)
        maps = open("/proc/self/maps").read()
        assert "libtvm_runtime" in maps, "the TVM runtime was not loaded"
        assert "libtvm_compiler" not in maps and "libtvm.so" not in maps, "compiler loaded"
        loaded = [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v]
        assert not loaded, f"torch was imported: {{loaded}}"
        print("RUNTIME-ONLY-OK")
    """)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "RUNTIME-ONLY-OK" in res.stdout, res.stdout + res.stderr


def _good(arch, batch=4):
    return make_batch(arch, batch, np.random.default_rng(0), max_bag=2, empty=0.0)


BAD_INPUTS = [
    ("dense float64", lambda d, o, i: (d.astype(np.float64), o, i), "dense_x must be float32"),
    ("dense 1-D", lambda d, o, i: (d[0], o, i), r"dense_x must have shape \[batch >= 1, 6\]"),
    ("dense width", lambda d, o, i: (d[:, :5], o, i), r"dense_x must have shape"),
    ("empty batch", lambda d, o, i: (d[:0], o[:, :0], i), r"batch >= 1"),
    ("offsets shape", lambda d, o, i: (d, o[:2], i), r"lS_o must have shape \[3, 4\]"),
    ("offsets float", lambda d, o, i: (d, o.astype(np.float32), i), "lS_o must be an integer"),
    ("too few tables", lambda d, o, i: (d, o, i[:2]), "lS_i has 2 index arrays, the model has 3"),
    ("index float", lambda d, o, i: (d, o, [i[0].astype(np.float32)] + i[1:]),
     r"lS_i\[0\] must be an integer"),
    ("index 2-D", lambda d, o, i: (d, o, [i[0].reshape(1, -1)] + i[1:]), r"lS_i\[0\] must be 1-D"),
    ("first offset", lambda d, o, i: (d, o + 1, i), r"lS_o\[0\]\[0\] is 1; the first bag must start"),
    ("decreasing", lambda d, o, i: (d, np.array([o[0], o[1], [0, 3, 1, 2]]), i),
     r"lS_o\[2\] decreases at position 2"),
    ("offset past end", lambda d, o, i: (d, np.array([o[0], o[1], [0, 1, 2, 99]]), i),
     r"lS_o\[2\]\[3\] = 99 is past the end of lS_i\[2\]"),
    ("index too big", lambda d, o, i: (d, o, [i[0], np.array([0, 1, 2, 7, 4, 0, 0, 0]), i[2]]),
     r"lS_i\[1\]\[3\] = 7 is out of range for table 1 with 7 rows"),
    ("negative index", lambda d, o, i: (d, o, [i[0], i[1], np.array([0, -1, 0, 0, 0, 0, 0, 0])]),
     r"lS_i\[2\]\[1\] = -1 is out of range for table 2 with 5 rows"),
]


@pytest.mark.usefixtures("fill")
@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error(compiled, name, mutate, message):
    c = compiled(TINY)
    dense, offsets, indices = _good(TINY)
    indices = [np.concatenate([i, np.zeros(8 - len(i), np.int64)]) for i in indices]
    with pytest.raises(InputError, match=message):
        c.runtime.predict(*mutate(dense, offsets, indices))


INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)


@pytest.mark.usefixtures("fill")
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda t: np.dtype(t).name)
def test_every_integer_dtype_for_offsets_and_indices(compiled, dtype):
    """Any integer dtype is read as the same values; each type's edge values, as an offset or
    an index, are refused (compared as int64, never wrapped into a range that passes)."""
    c = compiled(TINY)
    dense, offsets, indices = make_batch(TINY, 13, np.random.default_rng(5), max_bag=3,
                                         empty=0.0)
    want = c.runtime.predict(dense, offsets, indices)
    typed_o, typed_i = offsets.astype(dtype), [i.astype(dtype) for i in indices]
    np.testing.assert_array_equal(c.runtime.predict(dense, typed_o, typed_i), want)
    info = np.iinfo(dtype)
    for edge in sorted({int(info.min), int(info.max), int(info.max) - 1} - {0}):
        o = typed_o.copy()
        o[1, 6] = edge
        with pytest.raises(InputError, match=r"lS_o\[1"):
            c.runtime.predict(dense, o, typed_i)
        o = typed_o.copy()
        o[2, -1] = edge
        with pytest.raises(InputError, match=r"lS_o\[2"):
            c.runtime.predict(dense, o, typed_i)
        idx = [i.copy() for i in typed_i]
        idx[2][0] = edge
        with pytest.raises(InputError, match=rf"lS_i\[2\]\[0\] = {edge} is (out of range for "
                                             rf"table 2|beyond int64's range)"):
            c.runtime.predict(dense, typed_o, idx)


@pytest.mark.usefixtures("fill")
def test_tables_of_different_dtypes_and_index_counts_that_outgrow_the_buffer(compiled):
    """``predict`` concatenates the tables' index arrays straight into its bucket's buffer,
    which grows with the batch's index count: tables of different integer dtypes and batches
    of growing and shrinking bags at each batch size give PyTorch's predictions."""
    c = compiled(TINY)
    rng = np.random.default_rng(11)
    for batch in (4, 3, 1):
        for max_bag in (1, 9, 40, 2, 25):
            dense, offsets, indices = make_batch(TINY, batch, rng, max_bag=max_bag)
            typed = [i.astype(INT_DTYPES[(batch + max_bag + k) % len(INT_DTYPES)])
                     for k, i in enumerate(indices)]
            np.testing.assert_allclose(c.runtime.predict(dense, offsets, typed),
                                       torch_predict(c.model, dense, offsets, indices),
                                       rtol=1e-5, atol=2e-6)


def test_unsigned_offsets_past_int64_through_dlrm_run(compiled, tmp_path):
    c = compiled(TINY)
    dense, offsets, indices = make_batch(TINY, 9, np.random.default_rng(6), empty=0.0)
    o = offsets.astype(np.uint64)
    o[0, 4] = 2 ** 63 + 5
    np.savez(tmp_path / "b.npz", dense_x=dense, lS_o=o,
             **{f"lS_i_{k}": i for k, i in enumerate(indices)})
    res = run("dlrm-run", c.path, "--input", tmp_path / "b.npz", check=False, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "lS_o[0, 4] = 9223372036854775813 is beyond int64's range" in res.stderr


@pytest.mark.usefixtures("fill")
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=str)
def test_non_finite_dense_features_are_refused_on_every_bucket_path(compiled, value):
    """PyTorch gives NaN for such a row, the compiled ReLU would not: refused instead."""
    c = compiled(TINY)
    for batch in (4, 3, 37, 2, 1):    # exact bucket, padded, split over the largest, main
        dense, offsets, indices = make_batch(TINY, batch, np.random.default_rng(batch))
        dense[-1, 2] = value
        with pytest.raises(InputError, match=rf"dense_x\[{batch - 1}, 2\] is {value}; dense "
                                             r"features must be finite"):
            c.runtime.predict(dense, offsets, indices)


@pytest.mark.usefixtures("fill")
def test_concurrent_predict_on_one_model_equals_serial(compiled):
    """8 threads x 200 calls on one loaded model, batch sizes across every bucket path; each
    output equals the single-threaded one."""
    import threading

    c = compiled(TINY)
    model = load(str(c.path))
    rng = np.random.default_rng(8)
    batches = [make_batch(TINY, b, rng, max_bag=4) for b in (1, 2, 3, 4, 13, 16, 20, 37, 50)]
    want = [model.predict(*b) for b in batches]
    wrong, errors = [], []

    def work(k):
        try:
            for j in range(200):
                n = (7 * k + j) % len(batches)
                if not np.array_equal(model.predict(*batches[n]), want[n]):
                    wrong.append((k, j, n))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not wrong, (errors[:3], wrong[:3])
    assert not any(t.is_alive() for t in threads)


def _copy(c, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(c.path, dst)
    return dst


def test_corrupt_or_missing_artifact_files(compiled, tmp_path):
    c = compiled(TINY)
    with pytest.raises(ArtifactError, match="does not exist"):
        load(str(tmp_path / "nowhere"))
    art = _copy(c, tmp_path)
    with open(art / "weights.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"weights.bin is corrupt \(sha256 mismatch\)"):
        load(str(art))
    shutil.rmtree(art)
    art = _copy(c, tmp_path)
    os.remove(art / "model.so")
    with pytest.raises(ArtifactError, match="model.so is missing"):
        load(str(art))
    shutil.rmtree(art)
    art = _copy(c, tmp_path)
    (art / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        load(str(art))
    manifest = json.loads((c.path / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(ArtifactError, match="format version 99"):
        load(str(art))
    os.remove(art / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load(str(art))


def test_a_thread_count_that_is_not_positive_is_refused(compiled, monkeypatch):
    """threads=-1 reached TVM's thread pool, which then freed memory twice (the process
    aborted); each bad count is a ValueError naming where it came from."""
    from dlrmc.runtime import load

    path = str(compiled(TINY).path)
    for bad in (-1, 0, 2.5, "2", True):
        with pytest.raises(ValueError, match=f"threads must be a positive integer, got {bad!r}"):
            load(path, threads=bad)
    monkeypatch.setenv("TVM_NUM_THREADS", "-3")
    with pytest.raises(ValueError, match="TVM_NUM_THREADS must be a positive integer, got -3"):
        load(path)
    monkeypatch.delenv("TVM_NUM_THREADS")
    assert load(path, threads=1).threads == 1


def test_manifest_describes_the_artifact(compiled):
    c = compiled(TINY)
    m = json.loads((c.path / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION == 3 and m["tuning_log"] is None
    assert [i["name"] for i in m["inputs"]] == ["dense_x", "indices", "offsets"]
    assert m["inputs"][2]["shape"] == ["3*batch+1"] and m["dynamic_dims"]["indices"] == [0, None]
    assert m["inputs"][0]["shape"] == ["batch", 6] and m["dynamic_dims"]["batch"] == [1, None]
    assert m["target"]["string"] == "llvm" and m["target"]["resolved"]["kind"] == "llvm"
    assert m["tvm_version"].startswith("0.27") and m["dlrmc_version"]
    assert set(m["files"]) == {"model.so", "weights.bin"}
    names = [t["name"] for t in m["weights"]["tensors"]]
    assert sorted(names) == sorted(c.model.state_dict())
    # The weights live in weights.bin, not in the library: the largest table's bytes are not
    # inside model.so.
    emb = c.model.state_dict()["emb_l.0.weight"].numpy().tobytes()
    assert emb not in (c.path / "model.so").read_bytes()
    assert emb in (c.path / "weights.bin").read_bytes()


def test_mmap_load_gives_the_same_predictions(compiled):
    c = compiled(TINY)
    batch = make_batch(TINY, 21, np.random.default_rng(4), max_bag=6)
    mapped = load(str(c.path), mmap=True)
    np.testing.assert_array_equal(mapped.predict(*batch), c.runtime.predict(*batch))


def test_artifact_for_a_cpu_feature_we_lack_is_refused(compiled, tmp_path):
    from dlrmc.runtime.devices import check_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse sse2 avx avx2 fma\n")
    check_cpu({"machine": "x86_64", "cpu_flags": ["avx2", "fma"]}, str(info))
    with pytest.raises(ArtifactError, match="lacks: avx512f, avx512bw"):
        check_cpu({"machine": "x86_64", "cpu_flags": ["avx2", "avx512f", "avx512bw"]}, str(info))
    with pytest.raises(ArtifactError, match="built for aarch64"):
        check_cpu({"machine": "aarch64", "cpu_flags": []}, str(info))
    # A real artifact records what its target needs.
    m = json.loads((compiled(TINY).path / "manifest.json").read_text())
    assert m["target"]["requires"]["machine"] == "x86_64"


def test_requirements_follow_the_target():
    from dlrmc.targets import parse_target, requirements

    avx512 = requirements(parse_target("llvm -mcpu=skylake-avx512"))
    assert {"avx512f", "avx512bw", "avx2", "fma"} <= set(avx512["cpu_flags"])
    assert "avx512f" not in requirements(parse_target("llvm -mcpu=haswell"))["cpu_flags"]
    arm = requirements(parse_target("llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1"))
    assert arm["machine"] == "aarch64" and "asimddp" in arm["cpu_flags"]


def test_replace_weights_redeploys_without_recompiling(compiled, tmp_path):
    """New weights (a retrained model; weights remade where the artifact runs) go into an
    artifact's weight file without recompiling; wrong or missing ones are refused."""
    from dlrmc.artifact import replace_weights
    from dlrmc.frontend.model import DLRM

    c = compiled(TINY)
    art = tmp_path / "copy"
    shutil.copytree(c.path, art)
    retrained = DLRM(TINY, seed=99).eval()
    new = {k: v.numpy() for k, v in retrained.state_dict().items()}
    replace_weights(str(art), new)
    dense, offsets, indices = make_batch(TINY, 9, np.random.default_rng(3))
    got = load(str(art)).predict(dense, offsets, indices)          # digests verified
    np.testing.assert_allclose(got, torch_predict(retrained, dense, offsets, indices),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, torch_predict(c.model, dense, offsets, indices))
    bad = dict(new, **{"bot_l.0.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ArtifactError, match="bot_l.0.weight"):
        replace_weights(str(art), bad)
    with pytest.raises(ArtifactError, match="no new value"):
        replace_weights(str(art), {k: v for k, v in new.items() if k != "emb_l.0.weight"})
    assert load(str(art)).predict(dense, offsets, indices).tolist() == got.tolist()


def _flat(offsets, indices):
    """The reference layout as FBGEMM's flat one (indices, offsets [T*B+1]) and TorchRec's
    KeyedJaggedTensor one (values, lengths [T*B]), built independently of the runtime."""
    values = np.concatenate(indices)
    flat, start = [], 0
    lengths = []
    for o, idx in zip(offsets, indices):
        flat.extend(int(v) + start for v in o)
        ends = list(o[1:]) + [len(idx)]
        lengths.extend(int(e) - int(s) for s, e in zip(o, ends))
        start += len(idx)
    return values, np.array(flat + [start]), np.array(lengths)


@pytest.mark.usefixtures("fill")
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_flat_and_kjt_layouts_agree_with_pytorch(compiled, dtype):
    """predict_jagged and predict_kjt on variable bags with empty ones, across bucket paths."""
    c = compiled(TINY)
    rng = np.random.default_rng(11)
    for batch in (1, 3, 4, 16, 37):
        dense, offsets, indices = make_batch(TINY, batch, rng, max_bag=4, empty=0.3)
        want = torch_predict(c.model, dense, offsets, indices)
        values, flat_offsets, lengths = _flat(offsets, indices)
        np.testing.assert_allclose(c.runtime.predict_jagged(
            dense, values.astype(dtype), flat_offsets.astype(dtype)), want, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(c.runtime.predict_kjt(
            dense, values.astype(dtype), lengths.astype(dtype)), want, rtol=1e-5, atol=2e-6)


@pytest.mark.usefixtures("fill")
def test_bad_flat_and_kjt_input_names_the_table_and_position(compiled):
    c = compiled(TINY)
    dense, offsets, indices = make_batch(TINY, 4, np.random.default_rng(0), max_bag=2,
                                         empty=0.0)
    values, flat_offsets, lengths = _flat(offsets, indices)
    pos = flat_offsets[2 * 4] + 1                      # table 2, its second index
    bad = values.copy()
    bad[pos] = 5
    with pytest.raises(InputError, match=rf"indices\[{pos}\] = 5 \(table 2, position 1\) is "
                                         r"out of range for table 2 with 5 rows"):
        c.runtime.predict_jagged(dense, bad, flat_offsets)
    with pytest.raises(InputError, match=rf"values\[{pos}\] = 5 \(table 2, position 1\)"):
        c.runtime.predict_kjt(dense, bad, lengths)
    falling = flat_offsets.copy()
    falling[6] = falling[7] + 1
    with pytest.raises(InputError, match=r"offsets decreases at position 7 \(table 1, bag 3"):
        c.runtime.predict_jagged(dense, values, falling)
    with pytest.raises(InputError, match=r"offsets must have shape \[13\] \(tables x batch \+ 1\)"):
        c.runtime.predict_jagged(dense, values, flat_offsets[:-1])
    with pytest.raises(InputError, match=rf"offsets\[12\] = {len(values) - 1}, but indices "
                                         rf"holds {len(values)} values"):
        c.runtime.predict_jagged(dense, values, np.append(flat_offsets[:-1], len(values) - 1))
    neg = lengths.copy()
    neg[5] = -1
    with pytest.raises(InputError, match=r"lengths\[5\] = -1 \(table 1, bag 1\) is negative"):
        c.runtime.predict_kjt(dense, values, neg)
    with pytest.raises(InputError, match=rf"lengths add up to {len(values)}, but values holds "
                                         rf"{len(values) - 1} indices"):
        c.runtime.predict_kjt(dense, values[:-1], lengths)
    with pytest.raises(InputError, match=r"lengths must have shape \[12\]"):
        c.runtime.predict_kjt(dense, values, lengths[:-1])


def test_the_compiled_code_checks_its_flat_inputs(compiled, tmp_path):
    """A CPU artifact's entries refuse, themselves, a flat batch that points outside a table
    (``checked_inputs``), so ``predict`` gives them the batch after its cheap checks only.
    An artifact whose manifest does not say so (written by an earlier dlrmc) is checked in
    full before the call, and answers and refuses the same."""
    from dlrmc.frontend.ops import BAD_FLAT_INPUT
    from dlrmc.runtime.model import to_tvm

    c = compiled(TINY)
    assert c.runtime.manifest.checked_inputs
    dense, offsets, indices = make_batch(TINY, 4, np.random.default_rng(3), max_bag=2,
                                         empty=0.0)
    values, flat, _ = _flat(offsets, indices)
    bad = values.copy()
    bad[-1] = 5                                        # table 2 has 5 rows
    for size in (4, 0):                                # a bucket's entry, and main
        with pytest.raises(ValueError, match=BAD_FLAT_INPUT):
            c.runtime._entry(size)(*to_tvm([dense, bad, flat]), *c.runtime._weights)
    art = _copy(c, tmp_path)
    rewrite_manifest(art, lambda m: m.pop("checked_inputs"))
    old = load(str(art))
    assert not old.manifest.checked_inputs
    for batch in (1, 3, 4, 13, 37):
        d, o, i = make_batch(TINY, batch, np.random.default_rng(batch), max_bag=3)
        np.testing.assert_array_equal(old.predict(d, o, i), c.runtime.predict(d, o, i))
    for model in (old, c.runtime):
        with pytest.raises(InputError, match=rf"indices\[{len(bad) - 1}\] = 5 \(table 2"):
            model.predict_jagged(dense, bad, flat)


@pytest.mark.usefixtures("fill")
def test_bucket_inputs_are_rewritten_for_every_call(compiled):
    """Calls at one bucket reuse one thread's input tensors: a batch with many more indices
    than the last (the index buffer grows), a padded one after a full one, and the same
    batch in each layout, every answer PyTorch's."""
    c = compiled(TINY)
    rng = np.random.default_rng(12)
    for batch, max_bag in [(1, 2), (1, 400), (4, 1), (3, 2), (16, 60), (13, 0), (1, 0), (4, 9)]:
        dense, offsets, indices = make_batch(TINY, batch, rng, max_bag=max_bag, empty=0.1)
        want = torch_predict(c.model, dense, offsets, indices)
        values, flat, lengths = _flat(offsets, indices)
        for got in (c.runtime.predict(dense, offsets, indices),
                    c.runtime.predict_jagged(dense, values, flat),
                    c.runtime.predict_kjt(dense, values.astype(np.int32), lengths)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    same = [rng.integers(0, 5, 7) for _ in TINY.embedding_sizes]     # [T, N] as one array
    dense = rng.standard_normal((1, TINY.num_dense)).astype(np.float32)
    offsets = np.zeros((3, 1), np.int64)
    np.testing.assert_allclose(c.runtime.predict(dense, offsets, np.stack(same)),
                               torch_predict(c.model, dense, offsets, same), rtol=1e-5, atol=2e-6)


def test_dlrm_run_takes_the_flat_and_kjt_layouts(compiled, tmp_path):
    c = compiled(TINY)
    dense, offsets, indices = make_batch(TINY, 9, np.random.default_rng(12), empty=0.3)
    want = torch_predict(c.model, dense, offsets, indices)
    values, flat_offsets, lengths = _flat(offsets, indices)
    for name, arrays in {"flat": {"indices": values, "offsets": flat_offsets},
                         "kjt": {"values": values.astype(np.int32), "lengths": lengths}}.items():
        np.savez(tmp_path / f"{name}.npz", dense_x=dense, **arrays)
        run("dlrm-run", c.path, "--input", tmp_path / f"{name}.npz", "--output",
            tmp_path / f"{name}.npy", "--repeat", "1", timeout=300)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), want, rtol=1e-5, atol=2e-6)
    np.savez(tmp_path / "bad.npz", dense_x=dense, values=values, lengths=lengths[:-1])
    res = run("dlrm-run", c.path, "--input", tmp_path / "bad.npz", check=False, timeout=300)
    assert res.returncode == 2 and "lengths must have shape [27]" in res.stderr


def test_logits_of_a_model_that_ends_in_them(compiled, tmp_path):
    """A model whose top MLP ends in logits (TorchRec's DLRM): probabilities by default,
    logits on request; a model with the reference's sigmoid refuses to give logits."""
    import dataclasses

    logit_arch = dataclasses.replace(TINY, output="logit")
    c = compiled(logit_arch)
    dense, offsets, indices = make_batch(logit_arch, 9, np.random.default_rng(3), empty=0.2)
    logits = torch_predict(c.model, dense, offsets, indices)
    np.testing.assert_allclose(c.runtime.predict(dense, offsets, indices, logits=True), logits,
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(c.runtime.predict(dense, offsets, indices),
                               1 / (1 + np.exp(-logits)), rtol=1e-5, atol=2e-6)
    with pytest.raises(InputError, match="not logits"):
        compiled(TINY).runtime.predict(dense, offsets, indices, logits=True)
