"""dlrm-compile and dlrm-run end to end, as a user runs them; failures leave nothing behind."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import threading

import numpy as np
import pytest
import torch

from dlrmc.artifact import ArtifactError, write_artifact
from dlrmc.artifact.staging import atomic_file
from dlrmc.frontend.arch import Arch
from dlrmc.frontend.model import DLRM

from conftest import BARE_MANIFEST, foreign_target, make_batch, run, torch_predict, widest_runnable_target


def run_on_terminal(*cmd) -> tuple[subprocess.CompletedProcess, str]:
    """Run a command with its stderr on a pseudo-terminal, as in a shell: the result (stdout
    captured) and what the terminal showed."""
    master, slave = pty.openpty()
    # a terminal 80 columns wide (a new pty is 0 wide, and tqdm fits its bars to that)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    shown = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:         # EIO: the command closed the terminal's last end
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        res = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=slave,
                             text=True, timeout=600)
    finally:
        os.close(slave)
        reader.join(timeout=60)
        os.close(master)
    assert res.returncode == 0, b"".join(shown).decode(errors="replace")
    return res, b"".join(shown).decode(errors="replace")


def test_compile_checkpoint_then_run(tmp_path):
    arch = Arch(6, (30, 20, 10), (5, 12, 6), (8, 1), interaction_itself=True)
    model = DLRM(arch, seed=3).eval()
    torch.save({"state_dict": model.state_dict(), "train_acc": np.float64(0.5)}, tmp_path / "m.pt")
    out = tmp_path / "art"
    target = widest_runnable_target()
    res, terminal = run_on_terminal("dlrm-compile", "--target", target, "--load-model",
                                    str(tmp_path / "m.pt"), "-o", str(out), "--check", "7")
    for stage in ("export", "lower", "build", "write"):
        assert f"[dlrmc] {stage}" in res.stdout
        assert f"[dlrmc] {stage}" in terminal           # progress while it runs
    assert re.search(r"\[dlrmc\] write: +\d+%\|.*/2\.62k \[", terminal)   # weights' bytes
    assert "[dlrmc] check: loading" in res.stdout
    assert "max |dlrmc - PyTorch| over batch 7" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"]["interaction_itself"] is True
    assert manifest["target"]["resolved"]["mcpu"] == target.split("=")[1]

    dense, offsets, indices = make_batch(arch, 11, np.random.default_rng(2), max_bag=4)
    expected = torch_predict(model, dense, offsets, indices)
    # The [T, N] layout needs equal counts; use the per-table keys here and [T, N] below.
    np.savez(tmp_path / "b.npz", dense_x=dense, lS_o=offsets,
             **{f"lS_i_{k}": i for k, i in enumerate(indices)})
    res = run("dlrm-run", str(out), "--input", str(tmp_path / "b.npz"), "--output",
              str(tmp_path / "p.npy"), "--repeat", "3")
    assert "time per batch (B=11)" in res.stdout
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5, atol=2e-6)

    idx2d = np.stack([np.arange(22) % n for n in arch.embedding_sizes])
    off = np.tile(np.arange(0, 22, 2), (3, 1))
    np.savez(tmp_path / "c.npz", dense_x=dense, lS_o=off, lS_i=idx2d)
    res = run("dlrm-run", str(out), "--input", str(tmp_path / "c.npz"), "--output", str(tmp_path / "q"))
    assert f"wrote {tmp_path / 'q.npy'}" in res.stdout      # numpy's name, said as written
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"),
                               torch_predict(model, dense, off, list(idx2d)), rtol=1e-5, atol=2e-6)

    res = run("dlrm-run", str(out), "--random", "5", "--repeat", "2")
    assert "predictions [5, 1]" in res.stdout
    (tmp_path / "d.npy").mkdir()
    for where, message in [(tmp_path / "none" / "p.npy", "no directory"),
                           (tmp_path / "d.npy", "is a directory")]:
        res = run("dlrm-run", str(out), "--random", "5", "--output", str(where), check=False)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr

    np.savez(tmp_path / "bad.npz", dense_x=dense, lS_o=off, lS_i=idx2d + 100)
    res = run("dlrm-run", str(out), "--input", str(tmp_path / "bad.npz"), check=False)
    assert res.returncode == 2 and "out of range for table 0 with 30 rows" in res.stderr
    np.savez(tmp_path / "criteo.npz", X_int=np.zeros((4, 13)), X_cat=np.zeros((4, 26)),
             y=np.zeros(4), counts=np.ones(26))
    res = run("dlrm-run", str(out), "--input", str(tmp_path / "criteo.npz"), check=False)
    assert res.returncode == 2 and "processed Criteo file" in res.stderr and "dlrm-eval" in res.stderr
    whole = (tmp_path / "b.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:len(whole) // 2])
    res = run("dlrm-run", str(out), "--input", str(tmp_path / "cut.npz"), check=False)
    assert res.returncode == 2 and "cut.npz is not a readable .npz" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--target", "llvm -mcpu=nehalem2", "--preset", "tiny"], "unknown -mcpu 'nehalem2'"),
    (["--arch-embedding-size", "4-x"], "--arch-embedding-size must be dash-separated integers"),
    (["--arch-mlp-bot", "13-8"], "incomplete architecture"),
    (["--preset", "tiny", "--arch-sparse-feature-size", "5"],
     "does not match the last dim of the bottom MLP"),
    (["--load-model", "/nonexistent.pt"], "does not exist"),
    (["--preset", "tiny", "--check", "-1"], "--check wants a batch size"),
])
def test_compile_errors_are_clear_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = run("dlrm-compile", *args, "-o", str(out), check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def _empty_library(path, workspace):
    open(path, "wb").close()


def test_failed_write_leaves_nothing_and_never_clobbers(tmp_path):
    def fail(path, workspace):
        raise RuntimeError("linker exploded")

    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="linker exploded"):
        write_artifact(str(out), fail, [("w", np.ones(4, np.float32))], BARE_MANIFEST)
    assert os.listdir(tmp_path) == []
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(ArtifactError, match="not a dlrmc artifact; not overwriting"):
        write_artifact(str(precious), _empty_library, [], BARE_MANIFEST)
    assert (precious / "thesis.txt").read_text() == "do not delete"
    # An existing artifact is replaced whole.
    write_artifact(str(out), _empty_library, [("w", np.ones(4, np.float32))], BARE_MANIFEST)
    write_artifact(str(out), _empty_library, [("v", np.zeros(2, np.int64))], BARE_MANIFEST)
    names = [t["name"] for t in json.loads((out / "manifest.json").read_text())["weights"]["tensors"]]
    assert names == ["v"] and sorted(os.listdir(tmp_path)) == ["art", "precious"]


def test_a_file_output_is_whole_or_untouched(tmp_path):
    """atomic_file (checkpoints, predictions, synthetic logs): a write that fails leaves the old
    file as it was and no temporary beside it; one that succeeds replaces it whole."""
    path = tmp_path / "m.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["m.pt"]
    with atomic_file(str(path)) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["m.pt"]


def test_a_directory_that_is_not_only_an_artifact_is_never_replaced(tmp_path):
    """A manifest.json that is not dlrmc's, or an artifact with a user's file beside it: the
    compile is refused, before any model is built, and nothing in the directory is touched."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "manifest.json").write_text('{"name": "app"}')
    (w / "keep.txt").write_text("keep")
    res = run("dlrm-compile", "--preset", "tiny", "-o", str(w), check=False)
    assert res.returncode == 2 and "is not a dlrmc artifact; not overwriting it" in res.stderr
    assert "[dlrmc] export" not in res.stderr
    assert sorted(os.listdir(w)) == ["keep.txt", "manifest.json"]
    (w / "manifest.json").write_text("[" * 100000 + "]" * 100000)   # was a RecursionError
    with pytest.raises(ArtifactError, match="not a dlrmc artifact; not overwriting"):
        write_artifact(str(w), _empty_library, [], BARE_MANIFEST)
    assert (w / "keep.txt").read_text() == "keep"

    art = tmp_path / "art"
    write_artifact(str(art), _empty_library, [("w", np.ones(4, np.float32))], BARE_MANIFEST)
    (art / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="also holds notes.txt; not overwriting"):
        write_artifact(str(art), _empty_library, [("v", np.zeros(2, np.int64))], BARE_MANIFEST)
    assert (art / "notes.txt").read_text() == "mine"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    (tmp_path / "current").symlink_to(art)
    with pytest.raises(ArtifactError, match="current is a symbolic link; not replacing it"):
        write_artifact(str(tmp_path / "current"), _empty_library, [], BARE_MANIFEST)
    assert os.readlink(tmp_path / "current") == str(art) and (art / "notes.txt").exists()


def test_compile_for_a_cpu_we_are_not_on_builds_and_says_the_check_is_skipped(tmp_path):
    """A foreign target builds; --check and dlrm-run refuse to run it here, plainly (never
    SIGILL)."""
    target, out = foreign_target(), tmp_path / "art"
    res = run("dlrm-compile", "--target", target, "--preset", "tiny", "-o", str(out),
              "--check", "3", check=False)
    assert res.returncode == 0, res.stderr
    assert "[dlrmc] " not in res.stderr     # stderr a pipe: no progress lines
    assert "--check skipped on this machine" in res.stderr
    assert "needs CPU features this CPU lacks" in res.stderr
    assert (out / "model.so").is_file()
    res = run("dlrm-run", str(out), "--random", "2", check=False)
    assert res.returncode == 2 and "needs CPU features this CPU lacks" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow   # (~45 s; DCN and projection stay covered by the TorchRec and training tests)
def test_dcn_and_projection_from_flags_compile_and_match_pytorch(tmp_path):
    """TorchRec's DLRM_DCN and DLRM_Projection interactions spelled with flags, random
    weights (no checkpoint)."""
    res = run("dlrm-compile", "--preset", "tiny", "--arch-interaction-op", "dcn", "--dcn-layers",
              "3", "--dcn-low-rank", "5", "-o", str(tmp_path / "dcn.dlrmc"), "--check", "11",
              "--no-progress")
    assert "interaction dcn (3 layers of rank 5)" in res.stdout, res.stdout
    diff = float(res.stdout.split("max |dlrmc - PyTorch| over batch 11:")[1].split()[0])
    assert diff < 1e-6, res.stdout
    bad = run("dlrm-compile", "--preset", "tiny", "--arch-interaction-op", "dcn", "-o",
              str(tmp_path / "x"), check=False)
    assert bad.returncode != 0 and "needs --dcn-layers and --dcn-low-rank" in bad.stderr
    res = run("dlrm-compile", "--preset", "tiny", "--arch-interaction-op", "projection",
              "--projection-branch1", "32-16", "--projection-branch2", "24", "-o",
              str(tmp_path / "p.dlrmc"), "--check", "7", "--no-progress")
    assert "interaction projection (branches 32-16 and 24)" in res.stdout, res.stdout
    diff = float(res.stdout.split("max |dlrmc - PyTorch| over batch 7:")[1].split()[0])
    assert diff < 1e-6, res.stdout
    bad = run("dlrm-compile", "--preset", "tiny", "--arch-interaction-op", "projection",
              "--projection-branch1", "12", "--projection-branch2", "8", "-o",
              str(tmp_path / "y"), check=False)
    assert bad.returncode != 0 and "a multiple of the sparse feature size 8" in bad.stderr
