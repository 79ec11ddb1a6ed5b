"""The mechanics of installing a release (used by :mod:`upgrade.releases`).

Kept apart because it shells out: pip builds a wheel (which names the
version before anything is written under the releases root), ``venv``
makes the release's interpreter, pip installs the wheel into it, and a
probe run by the new interpreter reports what the release really is.

Virtualenvs are not relocatable: pip writes the venv's absolute path into
the ``#!`` line of every ``bin/`` script.  The release is built under a
temporary name and renamed into place, so :func:`relocate` rewrites those
paths first (the same thing ``virtualenv --relocatable`` used to do).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from keel.errors import FailedPrecondition, InvalidArgument

Progress = Callable[[str], None]

#: Not copied out of a source directory: VCS data, virtualenvs, caches and
#: build debris (pip builds in-tree; the caller's checkout stays untouched).
_SKIP = shutil.ignore_patterns(".git", ".venv", "venv*", "__pycache__", "*.egg-info", "build",
                               "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache",
                               ".hypothesis", "*.pyc")

#: What the new release's own interpreter reports: its version, its state
#: schemas, and whether the modules its shim and agent daemons run import
#: (a release whose shim fails at import would be refused only at upgrade).
_PROBE = """
import importlib, json, importlib.metadata as m
out = {"version": m.version("keel")}
try:
    import agent.state, shim.state
    out["shim_state"], out["agent_state"] = shim.state.SCHEMA_VERSION, agent.state.SCHEMA_VERSION
    for name in ("shim._start", "shim._daemon", "shim._delete", "agent.__main__", "agent._daemon"):
        importlib.import_module(name)
except Exception as exc:
    out["error"] = repr(exc)
    out["missing_dependency"] = (isinstance(exc, ModuleNotFoundError)
                                 and (exc.name or "").split(".")[0] not in ("keel", "shim",
                                 "agent", "upgrade", "opsd", "observability"))
print(json.dumps(out))
"""


@contextlib.contextmanager
def workdir(root: Path) -> Iterator[Path]:
    """A scratch directory under *root* (dot-named: never listed), removed after."""
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
        yield Path(tmp)


def wheel_of(source: Path, work: Path, build_isolation: bool, progress: Progress) -> Path:
    """*source* itself if it is a wheel, else a wheel pip builds from it into *work*."""
    if source.is_file() and source.suffix == ".whl":
        wheel_version(source)
        return source
    if source.is_dir():
        if not ((source / "pyproject.toml").exists() or (source / "setup.py").exists()):
            raise InvalidArgument(f"{source} is not a Python project (no pyproject.toml)")
        progress(f"copying {source} (without VCS, venv and cache directories)")
        tree = work / "src"
        shutil.copytree(source, tree, ignore=_SKIP, symlinks=True)
    elif source.is_file() and (source.name.endswith((".tar.gz", ".zip"))):
        tree = source
    elif not source.exists():
        raise InvalidArgument(f"{source} does not exist")
    else:
        raise InvalidArgument(f"{source}: expected a wheel (.whl), an sdist (.tar.gz)"
                              f" or a directory")
    progress(f"building a wheel from {source.name}")
    out = work / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-input",
         "--disable-pip-version-check", *([] if build_isolation else ["--no-build-isolation"]),
         "-w", str(out), str(tree)])
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise FailedPrecondition(f"building {source} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name (PEP 427); InvalidArgument unless it is keel."""
    parts = wheel.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise InvalidArgument(f"{wheel.name} is not a wheel file name")
    if re.sub(r"[-_.]+", "_", parts[0]).lower() != "keel":
        raise InvalidArgument(f"{wheel.name} is not a Keel package (it is {parts[0]!r})")
    return parts[1]


def _own_env() -> dict[str, str]:
    """This environment without PYTHONPATH and PYTHONHOME (a release runs its own code)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(argv: list[str]) -> None:
    """Run *argv*; FailedPrecondition with its last output lines if it fails.

    PYTHONPATH and PYTHONHOME are dropped: what is installed must not
    depend on the caller's source tree.
    """
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False, env=_own_env())
    if proc.returncode != 0:
        tail = "\n".join("  | " + line for line in proc.stdout.splitlines()[-15:])
        raise FailedPrecondition(f"{Path(argv[0]).name} {' '.join(argv[1:4])} ... failed"
                                 f" (exit {proc.returncode}):\n{tail}")


def probe(python: Path, progress: Progress, *, no_deps: bool = False) -> dict[str, Any]:
    """Ask the new release's interpreter for its version and state schemas;
    FailedPrecondition when its own modules do not import (with *no_deps*, a
    missing third-party dependency is only a warning)."""
    proc = subprocess.run([str(python), "-I", "-c", _PROBE], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    try:
        facts: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"the new release does not run: {proc.stderr[-500:]}") from exc
    if "error" in facts:
        if not (no_deps and facts.get("missing_dependency")):
            raise FailedPrecondition(f"the new release's shim or agent does not import:"
                                     f" {facts['error']}")
        progress(f"warning: the release cannot import its modules ({facts['error']});"
                 f" its entry points will not run until its dependencies are installed")
    return facts


def check_shim_runs(shim: Path, version: str) -> None:
    """The shim entry point starts and names *version* (``-v``); FailedPrecondition if not."""
    try:
        proc = subprocess.run([str(shim), "-v"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=False, timeout=60, env=_own_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"the new release's shim does not run: {exc}") from exc
    if proc.returncode != 0 or proc.stdout.split()[-1:] != [version]:
        raise FailedPrecondition(f"the new release's shim -v answered {proc.stdout.strip()!r}"
                                 f" (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")


def guest_agent(python: Path, release: Path, progress: Progress, *, no_deps: bool = False) -> None:
    """Have the new release's interpreter build its guest agent bundle into
    ``release/guest`` (what a VM receives to run this release's agent:
    shim/vmm/qemu/guest_release.py).  FailedPrecondition if it cannot; with
    *no_deps* only a warning (the release's VM agent upgrades will be refused)."""
    progress("building the guest agent bundle (for VM agent upgrades)")
    proc = subprocess.run([str(python), "-I", "-m", "shim.vmm.qemu.guest_release", "build",
                           str(release / "guest")], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False, timeout=300, env=_own_env())
    if proc.returncode == 0:
        return
    why = (proc.stderr.strip() or proc.stdout.strip())[-500:]
    if not no_deps:
        raise FailedPrecondition(f"building the new release's guest agent failed: {why}")
    progress(f"warning: no guest agent bundle ({why}); VM agent upgrades to this release"
             f" will be refused")


def guest_image(release: Path, out: Path | None, progress: Progress) -> None:
    """Have the installed *release* build (or reuse) its guest image in *out*
    (default: the image cache) and record it in the release (its shims boot
    it).  FailedPrecondition with the build's last lines if it fails."""
    argv = [str(release / "bin/python"), "-I", "-m", "shim.vmm.qemu.image", "build",
            "--release", str(release), *(["--out", str(out)] if out else [])]
    progress(f"building or reusing the guest image of {release.name} (the first build of a"
             f" node takes a few minutes)")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_own_env())
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        progress(f"  image: {line.rstrip()}")
        tail = [*tail[-14:], line.rstrip()]
    if proc.wait() != 0:
        raise FailedPrecondition(f"building the guest image of {release.name} failed (exit"
                                 f" {proc.returncode}):\n" + "\n".join("  | " + t for t in tail))


def relocate(stage: Path, final: Path) -> None:
    """Rewrite *stage*'s absolute path to *final* in bin/ scripts and pyvenv.cfg."""
    old, new = str(stage).encode(), str(final).encode()
    files = [p for p in (stage / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    for path in [*files, stage / "pyvenv.cfg"]:
        data = path.read_bytes()
        if old in data and b"\0" not in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            path.chmod(mode)
