"""The artifact cannot lie: a tampered, malformed, truncated or foreign-version artifact is an
ArtifactError naming the problem, never a crash, a KeyError or silent wrong output; writes
are atomic, replace with no gap, and sweep what killed writers left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dlrmc.artifact import ArtifactError, Manifest, read_manifest, write_artifact
from dlrmc.artifact.staging import recover, staging_dir
from dlrmc.runtime import load
from dlrmc.runtime.batch import random_batch

from conftest import BARE_MANIFEST, TINY, rewrite_manifest, run

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _copy(c, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(c.path, dst)
    return dst


def _swap_first_tables(m):
    t = {x["name"]: x for x in m["weights"]["tensors"]}
    a, b = t["emb_l.0.weight"], t["emb_l.1.weight"]
    a["offset"], b["offset"] = b["offset"], a["offset"]


def _shrink_table(m):
    t = next(x for x in m["weights"]["tensors"] if x["name"] == "emb_l.0.weight")
    t["shape"][0] -= 1
    t["nbytes"] -= 4 * t["shape"][1]


TAMPERING = {
    "weights outside": (lambda m: m["weights"].update(file="../other/weights.bin"),
                        "weights.file '../other/weights.bin' is not a plain file name"),
    "weights unlisted": (lambda m: m["weights"].update(file="model.so.bak"),
                         "weights.file 'model.so.bak' is not listed under files"),
    "files deleted": (lambda m: m.pop("files"), "files is missing"),
    "foreign file listed": (lambda m: m["files"].update({"/etc/hostname": {
        "sha256": "0" * 64, "bytes": 1}}), "'/etc/hostname' is not a plain file name"),
    "table rows raised": (lambda m: m["arch"]["embedding_sizes"].__setitem__(0, 10 ** 6),
                          "weight emb_l.0.weight is float32 [10, 4]; arch says float32 or uint8 "
                          "[1000000, 4]"),
    "tables swapped": (_swap_first_tables, "emb_l.0.weight is at offset"),
    "table shrunk": (_shrink_table, "emb_l.0.weight is float32 [9, 4]; arch says"),
    "bias as int32": (lambda m: next(t for t in m["weights"]["tensors"]
                                     if t["name"] == "top_l.2.bias").update(dtype="int32"),
                      "weight top_l.2.bias is int32 [1]; arch says float32 [1]"),
    "version as string": (lambda m: m.update(format_version="3"),
                          'format version "3"; this dlrmc reads version 3'),
    "version as bool": (lambda m: m.update(format_version=True), "format version true"),
    "entry missing": (lambda m: m.pop("entry"), "manifest.json: entry is missing"),
    "entry renamed": (lambda m: m.update(entry="nope"),
                      'manifest.json: entry "nope" is not a function of model.so'),
    "no transform": (lambda m: m.update(transform_params=None),
                     "manifest.json: transform_params null is not a function of model.so"),
    "bucket renamed": (lambda m: m["buckets"].update({"4": "main_b5"}),
                       'manifest.json: buckets.4 "main_b5" is not a function of model.so'),
    # a consistent tamper (digest rewritten) that names a function of the library, but not
    # one that runs the batch its field is for: refused at load, not at the first batch
    "buckets swapped": (lambda m: m["buckets"].update({"4": m["buckets"]["16"]}),
                        'manifest.json: buckets.4 "main_b16" does not run a batch of 4'),
    "bucket is transform_params": (lambda m: m["buckets"].update({"4": "transform_params"}),
                                   'buckets.4 "transform_params" does not run a batch of 4'),
    "entry is a bucket": (lambda m: m.update(entry=m["buckets"]["4"]),
                          'manifest.json: entry "main_b4" does not run a batch of 2'),
    "target not an object": (lambda m: m.update(target="llvm"),
                             "manifest.json: target must be dict"),
    "cpu flags not strings": (lambda m: m["target"]["requires"].update(cpu_flags=[1]),
                              "cpu_flags must be strings"),
    "bucket not a size": (lambda m: m["buckets"].update({"x": "main"}), "buckets must map"),
    # load runs each bucket once: an absurd size would be a huge allocation, not a check
    "bucket absurdly large": (lambda m: m["buckets"].update({str(10 ** 9): "main"}),
                              "buckets must map batch sizes (1 to 65536)"),
    "tensor offset a string": (lambda m: m["weights"]["tensors"][0].update(offset="0"),
                               "weights.tensors[0].offset must be int"),
    "arch rows not ints": (lambda m: m["arch"].update(embedding_sizes=[10, "7", 5]),
                           "arch.embedding_sizes must be a list of positive integers"),
    "weight renamed": (lambda m: m["weights"]["tensors"][-1].update(name="extra.bias"),
                       "the weights do not match arch: extra.bias unexpected, top_l.2.bias "
                       "missing"),
}


CLI_CASES = {"files deleted", "version as bool", "table rows raised"}   # also through dlrm-run


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_tampered_manifest_is_refused_naming_the_field(compiled, tmp_path, case):
    edit, message = TAMPERING[case]
    art = _copy(compiled(TINY), tmp_path)
    rewrite_manifest(art, edit)
    for verify in (True, False):
        with pytest.raises(ArtifactError) as err:
            load(str(art), verify=verify)
        assert message in str(err.value), (case, str(err.value))
    if case in CLI_CASES:
        res = run("dlrm-run", art, "--random", "2", check=False, timeout=300)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_the_manifest_is_covered_by_its_digest(compiled, tmp_path):
    art = _copy(compiled(TINY), tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["arch"]["embedding_sizes"][0] = 11            # edited alone, digest not rewritten
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest.json does not match manifest.sha256"):
        load(str(art), verify=False)
    os.remove(art / "manifest.sha256")
    with pytest.raises(ArtifactError, match="manifest.sha256 is missing"):
        load(str(art), verify=False)


def test_a_bucket_key_with_a_leading_zero_still_names_its_bucket(compiled, tmp_path):
    c = compiled(TINY)
    art = _copy(c, tmp_path)
    rewrite_manifest(art, lambda m: m["buckets"].update({"04": m["buckets"].pop("4")}))
    model = load(str(art))
    assert model.buckets == [4, 16]
    batch = random_batch(TINY.to_dict(), 4, bag_size=2, seed=3)
    np.testing.assert_array_equal(model.predict(*batch), c.runtime.predict(*batch))


def test_a_manifest_nested_absurdly_deep_is_corrupt_not_a_crash(compiled, tmp_path):
    art = _copy(compiled(TINY), tmp_path)
    deep = b"[" * 300_000 + b"]" * 300_000
    (art / "manifest.json").write_bytes(deep)
    (art / "manifest.sha256").write_text(f"{hashlib.sha256(deep).hexdigest()}  manifest.json\n")
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        load(str(art), verify=False)


def test_a_truncated_or_linked_file_is_refused_without_hashing(compiled, tmp_path):
    """verify=False skips the digests, never the sizes: a truncated library would die of
    SIGBUS in the loader."""
    art = _copy(compiled(TINY), tmp_path)
    size = (art / "model.so").stat().st_size
    os.truncate(art / "model.so", size // 2)
    with pytest.raises(ArtifactError, match=f"model.so is {size // 2} bytes, the manifest says "
                                            f"{size} \\(truncated or corrupt\\)"):
        load(str(art), verify=False)
    shutil.rmtree(art)
    art = _copy(compiled(TINY), tmp_path)
    os.rename(art / "weights.bin", tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", art / "weights.bin")
    with pytest.raises(ArtifactError, match="weights.bin is a symbolic link"):
        load(str(art), verify=False)


def test_an_artifact_of_format_version_1_gets_the_version_error(tmp_path):
    """A manifest as dlrmc wrote them before format 2 (kept as a fixture)."""
    art = tmp_path / "old"
    art.mkdir()
    shutil.copy(os.path.join(FIXTURES, "format1_manifest.json"), art / "manifest.json")
    for name in ("model.so", "weights.bin"):
        (art / name).write_bytes(b"")
    with pytest.raises(ArtifactError, match="has format version 1; this dlrmc reads version 3: "
                                            "recompile the model"):
        read_manifest(str(art))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _library(path, workspace):
    open(path, "wb").close()


def test_leftovers_of_killed_writers_are_swept(tmp_path):
    dead = _dead_pid()
    out = tmp_path / "art"
    write_artifact(str(out), _library, [("w", np.ones(3, np.float32))], BARE_MANIFEST)
    stale = [tmp_path / f".art.tmp-{dead}-0a1b", tmp_path / f".art.old-{dead}-0a1c"]
    live = tmp_path / ".art.tmp-1-0a1d"                 # pid 1 runs: its writer may be busy
    for d in stale + [live]:
        d.mkdir()
        (d / "lib0.o").write_bytes(b"\0" * 100)
    write_artifact(str(out), _library, [("w", np.ones(3, np.float32))], BARE_MANIFEST)
    assert sorted(os.listdir(tmp_path)) == [live.name, "art"]

    from dlrmc.frontend.criteo import preprocess
    (tmp_path / "day.txt").write_text("1\t" + "\t".join(["1"] * 13 + ["a"] * 26) + "\n")
    leftover = tmp_path / f".day.npz.tmp-{dead}-00ff"
    leftover.mkdir()
    preprocess(str(tmp_path / "day.txt"), str(tmp_path / "day.npz"))
    assert not leftover.exists() and (tmp_path / "day.npz").is_file()


def test_the_manifest_type_is_the_json_and_every_field_is_documented(compiled):
    """What a build writes is exactly the ``Manifest`` fields, each described in
    format.py's docstring, and reading gives back the same ``Manifest``."""
    import dataclasses

    from dlrmc.artifact import format as fmt

    c = compiled(TINY)
    raw = json.loads((c.path / "manifest.json").read_text())
    names = [f.name for f in dataclasses.fields(Manifest)]
    assert sorted(raw) == sorted(names)
    undocumented = [n for n in names if f"``{n}``" not in fmt.__doc__]
    assert not undocumented, undocumented
    assert read_manifest(str(c.path)) == Manifest(**raw)


def test_the_library_is_built_inside_the_staging_directory(tmp_path):
    """Intermediate objects (TVM's lib0.o) go under the artifact's staging directory, so a
    killed compile leaves them where the next one sweeps them, never in /tmp."""
    seen = []

    def library(path, workspace):
        seen.append(workspace)
        open(os.path.join(workspace, "lib0.o"), "wb").close()
        open(path, "wb").close()

    write_artifact(str(tmp_path / "art"), library, [], BARE_MANIFEST)
    assert os.path.dirname(seen[0]).startswith(str(tmp_path / ".art.tmp-"))
    assert sorted(os.listdir(tmp_path / "art")) == ["manifest.json", "manifest.sha256",
                                                    "model.so", "weights.bin"]


KILLED_REPLACE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from dlrmc.artifact import Manifest, staging, write_artifact
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "exchange":            # killed right after the one atomic step
        real = staging._exchange
        def exchange(a, b):
            assert real(a, b), "renameat2(RENAME_EXCHANGE) unsupported here"
            os._exit(9)
        staging._exchange = exchange
    else:                             # no exchange: killed between the two renames
        staging._exchange = lambda a, b: False
        real, calls = os.rename, []
        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                os._exit(9)
            real(a, b)
        staging.os.rename = rename
    write_artifact(out, lambda p, w: open(p, "wb").close(), [("new", np.ones(2, np.float32))],
                   Manifest(arch=None, entry="main", inputs=[], target={}))
""")


@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_a_replace_killed_midway_leaves_an_artifact_at_the_path(tmp_path, mode):
    out = tmp_path / "art"
    write_artifact(str(out), _library, [("old", np.zeros(2, np.float32))], BARE_MANIFEST)
    res = subprocess.run([sys.executable, "-c", KILLED_REPLACE, mode, str(out)], timeout=120)
    assert res.returncode == 9
    names = lambda: [t["name"] for t in json.loads(  # noqa: E731
        (out / "manifest.json").read_text())["weights"]["tensors"]]
    if mode == "exchange":
        assert names() == ["new"]              # the new one took the name in one step
    else:
        assert not out.exists()                # the gap, before recovery
        recover(str(out))                      # what the next writer does first
        assert names() == ["old"]
    recover(str(out))
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_staging_dirs_are_private_to_their_writer(tmp_path):
    a = staging_dir(str(tmp_path / "x"))
    b = staging_dir(str(tmp_path / "x"))   # the same live writer's own stay
    assert a != b and os.path.isdir(a) and os.path.isdir(b)


def _vm_flags(address: int) -> set[str]:
    """The kernel's VmFlags of this process's mapping holding ``address``."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("copy", [False, True], ids=["mapped", "copied"])
def test_weights_read_back_as_written_copy_on_write_and_advised(compiled, tmp_path, copy):
    from dlrmc.artifact import read_weights

    c = compiled(TINY)
    art = _copy(c, tmp_path)
    m = read_manifest(str(art))
    weights = read_weights(str(art), m, copy=copy)
    state = c.model.state_dict()
    for t, w in zip(m.weights["tensors"], weights):
        np.testing.assert_array_equal(w, state[t["name"]].numpy())
        assert w.ctypes.data % 64 == 0 and w.flags.writeable
    if os.path.exists("/proc/self/smaps"):     # copied: huge pages; mapped: random reads
        assert ("hg" if copy else "rr") in _vm_flags(weights[0].ctypes.data)
    weights[0][...] += 1          # copy-on-write: writing a weight never writes the file
    read_manifest(str(art))       # (its sha256 still matches)
    if copy:                      # and a copy no longer reads the file
        wfile = art / m.weights["file"]
        wfile.write_bytes(b"\0" * os.path.getsize(wfile))
        np.testing.assert_array_equal(weights[1], state[m.weights["tensors"][1]["name"]].numpy())
