"""The read-only guest root: Debian minbase + python3 + runc, the agent's
Python dependencies, and the Keel agent tree.

The host's own root file system is never shared with the guest (the guest
is untrusted): the root is a separate tree built by ``debootstrap`` from
Debian packages.  The agent's dependencies (grpclib, betterproto,
tenacity and theirs) come from PyPI as wheels for the guest's CPython 3.11,
installed with ``pip --target`` into ``/opt/keel/deps``; the agent code
(packages ``keel``, ``agent`` and ``upgrade``) is copied to ``/opt/keel/agent-<hash>``
so that image versions share one base root.  Everything is byte-compiled
with the guest's interpreter, because the guest cannot write ``.pyc`` files
to a read-only root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from keel import release
from keel.errors import Internal

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
#: Debian packages of the guest root beyond minbase.
PACKAGES = ("python3", "runc")
#: Python packages the agent imports in the guest (their dependencies follow).
PY_DEPS = ("grpclib", "betterproto", "tenacity")
_PY_DEFAULT_PINS = {"grpclib": "0.4.9", "betterproto": "2.0.0b7", "tenacity": "9.2.1"}
#: The Keel packages the agent needs at run time.
KEEL_PACKAGES = ("keel", "agent", "upgrade", "observability")
GUEST_PYTHON = "/usr/bin/python3"
DEPS_DIR = "/opt/keel/deps"


def run_tool(argv: Sequence[str], what: str, *, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> str:
    """Run a build tool; its stdout, or Internal naming *what* with the tool's message."""
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip()[-2000:]
        raise Internal(f"{what} failed (exit {res.returncode}): {tail}")
    return res.stdout


def py_pins() -> dict[str, str]:
    """``name -> version`` of the agent's deps: as installed here, else known-good pins."""
    from importlib import metadata

    pins = {}
    for name in PY_DEPS:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pins[name] = _PY_DEFAULT_PINS[name]
    return pins


def keel_tree_hash(repo: Path) -> str:
    """sha256 over the agent's source files (paths and contents)."""
    h = hashlib.sha256()
    for pkg in KEEL_PACKAGES:
        for path in sorted((repo / pkg).rglob("*.py")):
            h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def debootstrap(target: Path, debs: Path, packages: Sequence[str] = PACKAGES) -> None:
    """Build a minbase root with *packages* in *target* (must not exist)."""
    if shutil.which("debootstrap") is None:
        raise Internal("debootstrap is not installed (apt-get install debootstrap)")
    debs.mkdir(parents=True, exist_ok=True)
    run_tool(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
          f"--cache-dir={debs}", SUITE, str(target), MIRROR], "debootstrap")
    # Not needed at run time: package lists, docs, caches.
    for sub in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                "usr/share/locale", "usr/share/info"):
        shutil.rmtree(target / sub, ignore_errors=True)
    (target / "opt/keel").mkdir(parents=True, exist_ok=True)


def install_py_deps(target: Path, pins: dict[str, str]) -> None:
    """pip-install the agent's dependencies (cp311 wheels) into the root."""
    dest = target / DEPS_DIR.lstrip("/")
    tmp = dest.with_name("deps.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run_tool([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(tmp),
          "--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
          "--implementation", "cp", "--abi", "cp311",
          *(f"{name}=={version}" for name, version in sorted(pins.items()))],
         "pip install of the agent's dependencies")
    shutil.rmtree(tmp / "bin", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    compile_in_guest(target, DEPS_DIR)


def install_agent(target: Path, repo: Path, tree_hash: str, keel_release: str) -> str:
    """Copy the agent tree of release *keel_release* into the root (once per
    tree and release); returns its guest path.  The copy names its release
    (``keel/RELEASE``): the agent in the VM reports it."""
    ident = hashlib.sha256(f"{tree_hash}\0{keel_release}".encode()).hexdigest()
    guest = f"/opt/keel/agent-{ident[:16]}"
    dest = target / guest.lstrip("/")
    if (dest / ".complete").exists():
        return guest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for pkg in KEEL_PACKAGES:
        shutil.copytree(repo / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if keel_tree_hash(tmp) != tree_hash:
        # The tree changed between hashing and copying (an edit, a checkout):
        # caching this copy under the old hash would serve the wrong code.
        shutil.rmtree(tmp, ignore_errors=True)
        raise Internal(f"the agent tree under {repo} changed while it was copied; try again")
    release.write_marker(tmp / "keel", keel_release)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    compile_in_guest(target, guest)
    (dest / ".complete").touch()
    return guest


def compile_in_guest(target: Path, guest_dir: str) -> None:
    """Byte-compile *guest_dir* with the guest's own interpreter (chroot)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    run_tool(["chroot", str(target), GUEST_PYTHON, "-m", "compileall", "-q", guest_dir],
         f"byte-compiling {guest_dir} in the guest root", env=env)


def dpkg_versions(target: Path, names: Sequence[str]) -> dict[str, str]:
    """Installed versions of *names* in the root (for the image manifest)."""
    out = run_tool(["dpkg-query", f"--admindir={target / 'var/lib/dpkg'}", "-W",
                "-f", "${Package} ${Version}\n", *names], "dpkg-query")
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def size_bytes(path: Path) -> int:
    """Disk usage of *path* (regular files, not following links)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total
