"""opsd as a process: readiness, logging, who may call it, its systemd unit.

A real opsd subprocess with a real notify socket (a SOCK_DGRAM socket with
SO_PASSCRED, as systemd binds it) and the real opsctl; no sandboxes are
involved.  Rollouts are tested with stand-in shims in
tests/unit/test_opsd_standin.py and against real shims under a real
containerd in tests/integration/test_opsd_real.py.  Needs root (peer
credentials, setuid to nobody): the ``requires_root`` marker skips
loudly, or fails when CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.opsd_harness import REPO, Opsd, opsctl
from tests.prereq import skip_or_fail

pytestmark = pytest.mark.requires_root


@pytest.fixture
def opsd(short_tmp: Path) -> Iterator[Opsd]:
    """opsd over an empty state root and releases root."""
    d = Opsd(short_tmp)
    d.start()
    yield d
    d.close()


def test_ready_status_watchdog_and_socket(opsd: Opsd) -> None:
    ready = opsd.notify.wait_for("READY=1")
    assert ready.pid == opsd.proc.pid  # SCM_CREDENTIALS: sent by opsd itself
    assert "STATUS=idle" in ready.text
    opsd.notify.wait_for("WATCHDOG=1")
    st = opsd.socket.stat()
    assert oct(st.st_mode & 0o777) == "0o600" and st.st_uid == 0
    assert "listening on" in opsd.log()


def test_logs_go_to_the_journal_under_systemd(short_tmp: Path) -> None:
    """With $JOURNAL_STREAM naming its stderr, opsd logs through JournalHandler
    (journald is absent here, so the lines vanish) instead of writing stderr."""
    d = Opsd(short_tmp, env={"JOURNAL_STREAM": "<log>"})
    d.start()
    try:
        assert opsctl(d.socket, "ls").returncode == 0
    finally:
        d.close()
    assert "listening on" not in d.log() and "stopping" not in d.log()


def test_non_root_callers_are_refused(opsd: Opsd, short_tmp: Path) -> None:
    r = opsctl(opsd.socket, "ls", as_nobody=True)
    assert r.returncode == 1
    assert "permission denied on" in r.stderr and "must run as root" in r.stderr
    # Loosen the file mode: the peer-credential check is the second wall.
    open_dir = Path(tempfile.mkdtemp(prefix="kopsd-open-", dir="/tmp"))
    try:
        open_dir.chmod(0o755)
        exposed = open_dir / "opsd.sock"
        os.link(opsd.socket, exposed)
        exposed.chmod(0o666)
        r = opsctl(exposed, "ls", as_nobody=True)
        assert r.returncode == 1, r.stdout
        assert "opsd refuses uid 65534: only root may use it" in r.stderr
        assert "ListSandboxes from uid 65534" in opsd.log()
        assert opsctl(exposed, "ls").returncode == 0  # root still gets in
    finally:
        shutil.rmtree(open_dir)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("systemd-analyze missing (apt-get install systemd)")
    unit = (REPO / "deploy/systemd/keel-opsd.service").read_text()
    assert "ExecStart=/usr/local/bin/opsd " in unit
    launcher = tmp_path / "opsd"  # ExecStart must exist for verify: this tree's opsd
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m opsd \"$@\"\n")
    launcher.chmod(0o755)
    (tmp_path / "keel-opsd.service").write_text(unit.replace("/usr/local/bin/opsd", str(launcher)))
    r = subprocess.run([analyze, "verify", str(tmp_path / "keel-opsd.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "keel-opsd.service" not in r.stderr, r.stderr
    r = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--state-dir" in r.stdout
