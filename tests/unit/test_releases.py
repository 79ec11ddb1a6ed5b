"""Releases side by side: the compatibility rule, the layout, and real installs.

The install tests build real virtualenvs from this working tree (copied,
with the version bumped for the second release) and run their entry
points; about 25 s together (marked slow).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from upgrade.releases import (
    AGENT_ENTRY,
    SHIM_ENTRY,
    ReleaseStore,
    check_version,
    compatible,
    incompatibility,
    version_key,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("a, b, ok", [
    ("0.1.0", "0.2.0", True), ("0.2.0", "0.1.0", True), ("0.1.0", "0.1.7", True),
    ("1.4.2", "1.5.0rc1", True), ("0.1.0", "0.3.0", False), ("0.9.0", "1.0.0", False),
    ("1.0.0", "0.9.9", False), ("0+unknown", "0.1.0", True), ("", "0.1.0", False),
    ("0.1.0", "garbage", False),
])
def test_compatibility_rule(a: str, b: str, ok: bool) -> None:
    assert compatible(a, b) is ok
    assert (incompatibility(a, b) is None) is ok


def test_versions_are_checked_and_sorted() -> None:
    for bad in ("", "../x", "1.0/2", "v1.0", "1.0 ", "latest"):
        with pytest.raises(InvalidArgument):
            check_version(bad)
    assert sorted(["0.10.0", "0.2.0", "0.2.0rc1", "0.2.0.post1"], key=version_key) == [
        "0.2.0rc1", "0.2.0", "0.2.0.post1", "0.10.0"]


def _layout(root: Path, version: str) -> None:
    for entry in (SHIM_ENTRY, AGENT_ENTRY):
        (root / version / entry).parent.mkdir(parents=True, exist_ok=True)
        (root / version / entry).write_text("#!/bin/sh\n")


def test_current_and_remove_refusals(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path)
    assert store.list() == []
    for v in ("0.1.0", "0.2.0", "0.3.0"):
        _layout(tmp_path, v)
    (tmp_path / ".0.4.0.tmp").mkdir()  # an install in progress is not a release
    (tmp_path / "notes").mkdir()
    assert [r.version for r in store.list()] == ["0.1.0", "0.2.0", "0.3.0"]
    store.set_current("0.2.0")
    assert os.readlink(tmp_path / "current") == "0.2.0"
    assert store.current() is not None and store.current().version == "0.2.0"  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition, match="is current"):
        store.remove("0.2.0")
    with pytest.raises(FailedPrecondition, match="in use by sandbox a, sandbox b"):
        store.remove("0.1.0", {"0.1.0": {"sandbox b", "sandbox a"}})
    with pytest.raises(FailedPrecondition, match="in use"):
        store.remove("0.1.0", {"0.1.0"})
    with pytest.raises(NotFound, match="0.9.0 is not installed"):
        store.remove("0.9.0")
    with pytest.raises(NotFound):
        store.set_current("0.9.0")
    store.remove("0.3.0")
    assert [r.version for r in store.list()] == ["0.1.0", "0.2.0"]
    assert not [p for p in tmp_path.iterdir() if "removing" in p.name]


def test_install_refuses_bad_sources(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "rel")
    with pytest.raises(InvalidArgument, match="does not exist"):
        store.install(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="not a Python project"):
        store.install(tmp_path / "empty")
    wheel = tmp_path / "requests-2.0.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    with pytest.raises(InvalidArgument, match="not a Keel package"):
        store.install(wheel)


def _source(tmp: Path, version: str) -> Path:
    """This working tree with *version* in pyproject.toml."""
    src = tmp / f"src-{version}"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".*_cache", ".hypothesis", "*.egg-info", "build", "tests"))
    py = src / "pyproject.toml"
    py.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', py.read_text()))
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseStore]:
    tmp = tmp_path_factory.mktemp("releases")
    store = ReleaseStore(tmp / "releases")
    sources = [_source(tmp, v) for v in ("0.1.0", "0.2.0")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # installs of two versions overlap
        jobs = [pool.submit(store.install, s, build_isolation=False, progress=lambda s: None)
                for s in sources]
        for job in jobs:
            job.result()
    yield store


@pytest.mark.slow
def test_two_releases_side_by_side_run(installed: ReleaseStore) -> None:
    releases = installed.list()
    assert [r.version for r in releases] == ["0.1.0", "0.2.0"]
    for r in releases:
        assert r.manifest is not None and r.manifest.shim_state_schema == 1
        assert r.shim_path.exists() and r.agent_path.exists()
        # relocated: the entry point's interpreter is the release's own, under its final name
        assert (r.path / "bin/opsctl").read_text().splitlines()[0] == f"#!{r.path}/bin/python"
        out = subprocess.run([str(r.path / "bin/python"), "-I", "-c",
                              "import shim; print(shim.version())"],
                             capture_output=True, text=True, check=True, cwd="/")
        assert out.stdout.strip() == r.version
        subprocess.run([str(r.path / "bin/opsctl"), "--help"], capture_output=True, check=True)
    assert not [p for p in installed.root.iterdir() if p.name.endswith(".tmp")]
    src = installed.root.parent / "src-0.1.0"  # pip built from a copy: the source is untouched
    assert not (src / "build").exists() and not list(src.glob("*.egg-info"))


@pytest.mark.slow
def test_reinstall_needs_force(installed: ReleaseStore, tmp_path: Path) -> None:
    src = _source(tmp_path, "0.2.0")
    with pytest.raises(AlreadyExists, match="0.2.0 is already installed"):
        installed.install(src, build_isolation=False, progress=lambda s: None)
    with pytest.raises(FailedPrecondition, match="cannot reinstall release 0.2.0: it is in use"):
        installed.install(src, force=True, in_use={"0.2.0"}, build_isolation=False,
                          progress=lambda s: None)


@pytest.mark.slow
def test_a_release_whose_shim_does_not_import_is_refused(tmp_path: Path) -> None:
    """Found at install, not at the first upgrade: the daemon modules are imported
    by the release's own interpreter, and nothing of it stays behind."""
    src = _source(tmp_path, "0.3.0")
    with open(src / "shim" / "_daemon.py", "a") as f:
        f.write("\nraise ImportError('simulated: this shim cannot be imported')\n")
    store = ReleaseStore(tmp_path / "rel")
    with pytest.raises(FailedPrecondition, match=r"shim or agent does not import: .*simulated"):
        store.install(src, build_isolation=False, progress=lambda s: None)
    assert store.list() == []
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".0.3.0.lock")] == []


def _opsctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "opsd.cli", "--socket", "/nonexistent/opsd.sock",
                           *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_opsctl_release_commands(tmp_path: Path) -> None:
    rel, state = tmp_path / "rel", tmp_path / "state"
    common = ("release", "--releases", str(rel), "--state-root", str(state))
    r = _opsctl(*common, "install", str(_source(tmp_path, "0.3.0")), "--current", "--no-deps",
                "--no-build-isolation")
    assert r.returncode == 0, r.stderr
    assert "installed keel 0.3.0" in r.stdout and "current -> 0.3.0" in r.stdout
    _layout(rel, "0.2.0")
    r = _opsctl(*common, "list")
    assert r.returncode == 0 and re.search(r"(?m)^\* 0\.3\.0 ", r.stdout), r.stdout
    r = _opsctl(*common, "remove", "0.3.0")
    assert r.returncode == 1 and "release 0.3.0 is current" in r.stderr
    r = _opsctl(*common, "remove", "0.2.0")
    assert r.returncode == 0, r.stderr
    assert "active upgrade plans not checked (cannot reach opsd" in r.stdout
    r = _opsctl(*common, "remove", "0.2.0")
    assert r.returncode == 1 and "0.2.0 is not installed" in r.stderr
