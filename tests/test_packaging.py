"""The sdist and wheel a release would publish, built and installed as a user would.

The whole round (sdist, wheel from the unpacked sdist, a fresh venv, the demo) takes about 20 s
with a warm pip cache, so it runs everywhere, not only in CI. It needs the package index
(build isolation fetches setuptools, the venv the dependencies) as `scripts/venv.sh` does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from proxy import metrics

ROOT = Path(__file__).resolve().parent.parent
# What a checkout holds besides the project (see .gitignore); the copy leaves it out, so a
# stale egg-info SOURCES.txt cannot slip files into the sdist.
NOT_PROJECT = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache", ".hypothesis"
)
NAME = "pipeconnect_proxy-" + metrics.VERSION


def sh(*args: str | Path, cwd: Path, timeout: float = 300) -> str:
    # No PYTHONPATH or VIRTUAL_ENV: nothing of the project's venv may leak into the fresh one.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel), the wheel built from the unpacked sdist, as pip would from the index."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=NOT_PROJECT)
    out = tmp / "dist"
    sh(sys.executable, "-m", "build", "--sdist", "--outdir", out, tree, cwd=tmp)
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", out, tmp / "unpacked" / NAME, cwd=tmp)
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_sdist_holds_what_builds_the_wheel(dists: tuple[Path, Path]) -> None:
    with tarfile.open(dists[0]) as tar:
        names = {n.removeprefix(f"{NAME}/") for n in tar.getnames()}
    assert {"pyproject.toml", "README.md", "LICENSE", "proxy/cli.py", "proxy/py.typed"} <= names
    assert not {n for n in names if n.split("/")[0] in ("tests", "bench", "fuzz", "deploy")}


def test_wheel_holds_the_package_alone(dists: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(dists[1]) as whl:
        names = whl.namelist()
        meta = HeaderParser().parsestr(whl.read(f"{NAME}.dist-info/METADATA").decode())
    assert {n.split("/")[0] for n in names} == {"proxy", f"{NAME}.dist-info"}
    assert "proxy/py.typed" in names
    assert f"{NAME}.dist-info/licenses/LICENSE" in names
    assert meta["License-Expression"] == "MIT"
    assert meta["Version"] == metrics.VERSION
    classifiers = meta.get_all("Classifier") or []
    assert "Topic :: Communications :: Email :: Mail Transport Agents" in classifiers
    assert "Typing :: Typed" in classifiers
    assert meta.get_all("Project-URL") is None  # nothing points outside the repository


def test_wheel_installs_and_runs_the_demo_in_a_fresh_venv(
    dists: tuple[Path, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    # sys.executable is the project's venv: -m venv builds on its base interpreter, clean.
    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    sh(venv / "bin/python", "-m", "pip", "install", "-q", dists[1], cwd=tmp_path)
    where = sh(venv / "bin/python", "-c", "import proxy; print(proxy.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(venv), where  # not the source tree
    version = sh(venv / "bin/pipeconnect-proxy", "--version", cwd=tmp_path)
    assert version == f"pipeconnect-proxy {metrics.VERSION}\n"
    demo = sh(venv / "bin/pipeconnect-proxy", "demo", cwd=tmp_path, timeout=60)
    assert "session 1: classic" in demo
    assert "session 2: early pipelining" in demo
    assert demo.count("demo MTA <= alice@demo.test") == 2


def test_version_without_metadata_comes_from_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(dist: str) -> str:
        raise PackageNotFoundError(dist)

    monkeypatch.setattr(metrics, "version", missing)
    assert metrics.package_version() == metrics.VERSION  # this tree's pyproject.toml
    assert metrics.package_version("another-project") == "unknown"
