"""The wheel installs everything under the one namespace ``dlrmc``, plus the entry points."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_dlrmc_namespace(tmp_path):
    # Build from a copy: setuptools leaves a build/ folder in the tree it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("dlrmc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dlrmc"}, tops
    for pkg in ("compiler", "frontend", "schedules", "targets", "runtime", "artifact"):
        assert f"dlrmc/{pkg}/__init__.py" in names
    assert not any(n.startswith("dlrmc/tests") for n in names)
    # runtime/_fill.c, compiled by the wheel's build (setup.py)
    assert any(n.startswith("dlrmc/runtime/_fill.") and n.endswith(".so") for n in names), names
    meta = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    assert "dlrm-compile = dlrmc.compiler.cli:main" in entry_points
    assert "dlrm-run = dlrmc.runtime.cli:main" in entry_points
    assert "[torch_dynamo_backends]" in entry_points and "dlrmc = " in entry_points
