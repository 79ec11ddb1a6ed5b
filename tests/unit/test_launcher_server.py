"""The launcher (shim/_launcher.py) on its own: bad requests, trust, lifetime.

A real launcher process is started on a socket in a temp directory; what
it forks (shim daemons, agents) is exercised by the containerd tests
(tests/integration/test_launcher.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import _launcher

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _start(sock: Path, idle: float = 60.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-P", "-m", "shim._launcher", "--socket", str(sock),
                             "--idle", str(idle)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


@pytest.fixture
def launcher() -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    # Not below pytest's tmp_path (0700 for root): one test connects as nobody.
    top = Path(tempfile.mkdtemp(prefix="keel-launcher-", dir="/tmp"))
    top.chmod(0o711)
    sock = top / "launcher" / "k.sock"
    sock.parent.mkdir(mode=0o700)
    proc = _start(sock)
    try:
        _wait(lambda: sock.exists() or proc.poll() is not None, 60, "launcher socket")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(top)


def _raw(sock: Path, data: bytes) -> dict[str, object]:
    """Send raw bytes, half-close, read the framed reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply, fds = _launcher._recv(s)
        assert fds == []
        return reply


def _frame(doc: object) -> bytes:
    body = json.dumps(doc).encode()
    return struct.pack(">I", len(body)) + body


GOOD = {"argv": ["-id", "x"], "env": {"A": "b"}, "cwd": "/"}


@pytest.mark.parametrize("data,said", [
    (struct.pack(">I", 5) + b"hello", "malformed message"),
    (struct.pack(">I", _launcher.MAX_MESSAGE + 1) + b"{}", "over the size limit"),
    (_frame([1, 2]), "not an object"),
    (_frame({"op": "exec", **GOOD}), "unknown op 'exec'"),
    (_frame({"op": "shim", **GOOD, "argv": "-id x"}), "argv must be a list"),
    (_frame({"op": "shim", **GOOD, "env": {"A": 1}}), "env must map strings"),
    (_frame({"op": "shim", **GOOD, "cwd": "relative"}), "cwd must be an absolute path"),
    (_frame({"op": "shim", **GOOD}), "shim takes 1 fds, got 0"),
    (_frame({"op": "agent", **GOOD}), "agent needs hostname and log"),
    (struct.pack(">I", 100) + b"{", "connection closed mid-message"),
])
def test_bad_requests_get_an_error_and_the_launcher_serves_on(
        launcher: tuple[Path, subprocess.Popen[bytes]], data: bytes, said: str) -> None:
    sock, proc = launcher
    reply = _raw(sock, data)
    assert said in str(reply.get("error")), reply
    assert proc.poll() is None
    # Still serving: the next request gets its own answer.
    with pytest.raises(_launcher.LauncherError, match="unknown op"):
        _launcher.request(sock, {"op": "nothing", **GOOD})


def test_a_trickling_caller_is_dropped_within_the_request_deadline(
        launcher: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """A byte every second never completes a request: the launcher answers
    with an error after 5 s in all (not 5 s per byte) and serves on."""
    sock, proc = launcher
    data = _frame({"op": "shim", **GOOD})
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(sock))
        t0 = time.monotonic()
        s.setblocking(False)
        reply = b""
        for b in data:
            try:
                s.send(bytes([b]))
            except OSError:
                break  # the launcher closed the connection
            time.sleep(1.0)
            try:
                reply = s.recv(4096)
            except BlockingIOError:
                continue
            break
        took = time.monotonic() - t0
    assert b"did not arrive within 5s" in reply, reply
    assert took < 8, f"held for {took:.1f}s"
    assert proc.poll() is None
    with pytest.raises(_launcher.LauncherError, match="unknown op"):
        _launcher.request(sock, {"op": "nothing", **GOOD})


def test_shim_with_an_action_is_refused(launcher: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, _ = launcher
    r, w = os.pipe()
    try:
        with pytest.raises(_launcher.LauncherError, match="without an action"):
            _launcher.request(sock, {"op": "shim", **GOOD, "argv": ["-id", "x", "delete"]}, [r])
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.requires_root
def test_a_caller_of_another_uid_is_refused(launcher: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """The socket is 0600 in a 0700 directory; opened up, the peer
    credentials still keep another uid out."""
    sock, proc = launcher
    sock.parent.chmod(0o711)
    sock.chmod(0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # as nobody, without an exec (the interpreter may live under /root)
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                _launcher.request(sock, {"op": "shim", **GOOD})
                said = "answered"
            except _launcher.LauncherError as exc:
                said = str(exc)
            os.write(w, said.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        said = f.read()
    os.waitpid(pid, 0)
    assert "peer uid 65534 is not 0" in said, said
    assert proc.poll() is None


def test_one_launcher_per_socket(launcher: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = launcher
    second = _start(sock)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, out
    assert proc.poll() is None and sock.exists()
    assert not _launcher.needs_spawn(sock)
    assert int(sock.with_suffix(".lock").read_text()) == proc.pid


def test_idle_exit_removes_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    proc = _start(sock, idle=1.0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert not sock.exists()
    assert b"exiting (idle)" in out
    assert _launcher.needs_spawn(sock)
    with pytest.raises(_launcher.NotRunning):
        _launcher.request(sock, {"op": "shim", **GOOD})


def test_sigterm_exits_and_removes_the_socket(launcher: tuple[Path, subprocess.Popen[bytes]]) -> None:
    sock, proc = launcher
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not sock.exists()


def test_release_key_ignores_the_working_directory_only(tmp_path: Path) -> None:
    code = "import os, sys; sys.path.insert(0, os.getcwd()); from shim import _launcher; print(_launcher.release_key())"

    def key(cwd: Path, **env: str) -> str:
        return subprocess.run([sys.executable, "-c", code], env={**ENV, **env}, cwd=cwd,
                              capture_output=True, text=True, check=True).stdout.strip()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert key(tmp_path / "a") == key(tmp_path / "b")
    # Another module path (another release's) is another launcher.
    assert key(tmp_path / "a") != key(tmp_path / "a", PYTHONPATH=f"{tmp_path}:{REPO}")


def test_a_pid_the_caller_never_took_does_not_run(
        launcher: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """A caller that gave up waiting (and starts the daemon itself) never
    acknowledges the pid: the launcher's child must exit, not serve."""
    sock, proc = launcher
    proc.send_signal(signal.SIGSTOP)
    listener = socket.socket(socket.AF_UNIX)
    try:
        with pytest.raises(_launcher.LauncherError, match="timed out"):
            _launcher.request(sock, {"op": "shim", **GOOD}, [listener.fileno()], timeout=1.0)
    finally:
        proc.send_signal(signal.SIGCONT)
        listener.close()
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""

    def logged() -> re.Match[bytes] | None:
        nonlocal seen
        seen += proc.stdout.read() or b""  # type: ignore[union-attr]
        return re.search(rb"left before it took \{'pid': (\d+)\}", seen)

    _wait(logged, 30, "the launcher to drop the request")
    child = int(logged().group(1))  # type: ignore[union-attr]
    _wait(lambda: not _alive(child), 10, f"its child {child} to exit")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
