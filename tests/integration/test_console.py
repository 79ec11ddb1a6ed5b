"""``opsctl console`` against a real pod: real containerd, the Keel shim
(process backend), a real opsd, and opsctl run as a user runs it, through a
real pseudo-terminal for the interactive cases.

Checked: refused while disabled (and after ``disable``), with the command
that enables it; non-interactive sessions with stdout and stderr apart, stdin
sent, the remote exit code as opsctl's; a session in a container's
namespaces; an interactive shell (prompt, ``stty size`` before and after a
resize, Ctrl-C to a running ``sleep``, exit status); detach, after which the
session is gone; 10 concurrent sessions; a caller opsd does not admit; the
audit records, field by field, in the sandbox's ``audit.log`` (0600) and in
opsd's log.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shim.api import SandboxDir
from tests.console_pty import Pty
from tests.containerd import Containerd, wait_for
from tests.integration.keel_ctr import host_pids, kill_and_remove, run_detached
from tests.opsd_harness import ENV, REPO, Opsd, opsctl, running_opsd

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]


@pytest.fixture
def node(containerd: Containerd, container_ids: Callable[[], str]) -> Iterator[Opsd]:
    """A real opsd for this test; stopped before the test's leftover check
    (which would see it: its command line names the state root)."""
    with tempfile.TemporaryDirectory(prefix="keel-con-rel-") as releases:
        with running_opsd("kcon-", Path(releases), containerd.paths.tmp_root / "keel",
                          {"status": 5}) as d:
            yield d


@pytest.fixture
def pod(containerd: Containerd, busybox: str, container_ids: Callable[[], str]
        ) -> Iterator[tuple[str, int]]:
    cid = container_ids()
    pid = run_detached(containerd, busybox, cid, "sleep", "100000")  # one per test
    try:
        yield cid, pid
    finally:
        kill_and_remove(containerd, cid)


def _audit(ctd: Containerd, cid: str) -> list[dict[str, Any]]:
    path = SandboxDir.of(ctd.paths.tmp_root / "keel", cid).audit_log
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_disabled_then_enabled_non_interactive(containerd: Containerd, node: Opsd,
                                               pod: tuple[str, int]) -> None:
    cid, _ = pod
    [pid] = host_pids(containerd, "sleep 100000")  # ctr shows the sandbox's own pid
    r = opsctl(node.socket, "console", cid, "--", "true")
    assert r.returncode == 1, r
    assert f"the console of sandbox {cid} is disabled; enable it with: opsctl console enable" \
        f" {cid}" in r.stderr, r.stderr

    r = opsctl(node.socket, "console", "enable", cid)
    assert (r.returncode, r.stdout.strip()) == (0, f"console of sandbox {cid}: enabled"), r
    r = opsctl(node.socket, "console", cid, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n"), r
    # stdin goes through (and is closed at its end); -T is the default off a terminal.
    r = subprocess.run([sys.executable, "-m", "opsd.cli", "--socket", str(node.socket),
                        "console", cid, "-T", "--", "sh", "-c", "tr a-z A-Z; exit 0"],
                       input="hello console\n", capture_output=True, text=True, env=ENV,
                       cwd=REPO, timeout=60)
    assert (r.returncode, r.stdout) == (0, "HELLO CONSOLE\n"), r

    # In the container: its pid namespace and cgroups, with the agent's tools.
    r = opsctl(node.socket, "console", cid, "--container", cid, "--", "sh", "-c",
               "readlink /proc/self/ns/pid; cat /proc/self/cgroup")
    assert r.returncode == 0, r
    # The tools are the agent's, not the image's: bash, which busybox's image has not.
    r2 = opsctl(node.socket, "console", cid, "--container", cid, "--", "bash", "-c",
                'test -e "$KEEL_CONTAINER_ROOT/bin/busybox" && ! test -e '
                '"$KEEL_CONTAINER_ROOT/bin/bash" && echo image-has-no-bash')
    assert (r2.returncode, r2.stdout) == (0, "image-has-no-bash\n"), r2
    assert os.readlink(f"/proc/{pid}/ns/pid") in r.stdout, (r.stdout, pid)
    with open(f"/proc/{pid}/cgroup") as f:
        memory = [line for line in f.read().splitlines() if ":memory:" in line]
    assert memory and memory[0] in r.stdout.splitlines(), (memory, r.stdout)

    # Ten at once.
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        runs = list(pool.map(lambda n: opsctl(node.socket, "console", cid, "--", "sh", "-c",
                                              f"sleep 1; echo session-{n}"), range(10)))
    assert [(x.returncode, x.stdout) for x in runs] == [(0, f"session-{n}\n")
                                                       for n in range(10)], runs

    # A caller opsd does not admit.
    r = opsctl(node.socket, "console", cid, "--", "true", as_nobody=True)
    assert r.returncode == 1 and ("refuses uid 65534" in r.stderr
                                  or "permission denied" in r.stderr), r

    r = opsctl(node.socket, "console", "no-such-pod", "--", "true")
    assert r.returncode == 1 and "sandbox no-such-pod not found or not running" in r.stderr, r

    r = opsctl(node.socket, "console", "disable", cid)
    assert r.returncode == 0, r
    r = opsctl(node.socket, "console", cid, "--", "true")
    assert r.returncode == 1 and "is disabled" in r.stderr, r

    records = _audit(containerd, cid)
    assert [x["event"] for x in records[:3]] == ["console-enabled", "console-start",
                                                 "console-end"], records[:3]
    start, end = records[1], records[2]
    assert {k: start[k] for k in ("sandbox", "container", "argv", "terminal", "uid")} == {
        "sandbox": cid, "container": "", "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"],
        "terminal": False, "uid": 0}, start
    assert start["pid"] > 0 and start["time"] > 0
    assert {k: end[k] for k in ("session", "reason", "exit_status", "bytes_in", "bytes_out")} \
        == {"session": start["session"], "reason": "exited", "exit_status": 3, "bytes_in": 0,
            "bytes_out": 8}, end
    piped = [x for x in records if x["event"] == "console-end" and x["bytes_in"] == 14]
    assert len(piped) == 1 and piped[0]["bytes_out"] == 14, records
    assert sum(x["event"] == "console-start" for x in records) == 14, records
    assert records[-1]["event"] == "console-disabled"
    log = node.log()
    assert re.search(rf"console {start['session']} opened by uid 0 \(pid \d+, tty none\) on "
                     rf"sandbox {cid}: \['sh', '-c', 'echo out; echo err >&2; exit 3'\]", log)
    assert f"console {start['session']} ended (exited): exit 3, 0 bytes in, 8 bytes out" in log


def test_interactive_shell_resize_ctrl_c_and_detach(containerd: Containerd, node: Opsd,
                                                    pod: tuple[str, int]) -> None:
    cid, _ = pod
    assert opsctl(node.socket, "console", "enable", cid).returncode == 0
    t = Pty("--socket", str(node.socket), "console", cid, "--", "/bin/sh", "-i")
    try:
        t.expect(rb"# ")
        t.type(b"stty size; tty\n")
        t.expect(rb"\r\n30 100\r\n/dev/pts/\d+")
        t.resize(40, 120)
        time.sleep(0.5)  # the resize travels opsctl -> opsd -> shim -> agent
        t.type(b"stty size\n")
        t.expect(rb"\r\n40 120\r\n")
        t.type(b"sleep 100; echo not-interrupted\n")
        time.sleep(1)
        t.type(b"\x03")  # Ctrl-C: SIGINT to the remote foreground job, not to opsctl
        t.type(b"echo rc=$?\n")
        seen = t.expect(rb"rc=130")
        assert b"not-interrupted\r\n" not in seen
        t.type(b"exit 5\n")
    finally:
        rc = t.close()
    assert rc == 5

    # Detach (Ctrl-]): opsctl leaves, and the session (a sleep) is ended and reaped.
    t = Pty("--socket", str(node.socket), "console", cid, "--", "sleep", "1000")
    try:
        wait_for(lambda: "sleep 1000" in opsctl(node.socket, "console", "ls").stdout, 30,
                 "the session to be listed")
        t.type(b"\x1d")
        t.expect(rb"detached")
    finally:
        rc = t.close()
    assert rc == 0
    wait_for(lambda: "(no console sessions)" in opsctl(node.socket, "console", "ls").stdout, 30,
             "the detached session to be reaped")
    wait_for(lambda: _audit(containerd, cid)[-1].get("reason") == "the client detached", 30,
             "the detach's audit record")
    end = _audit(containerd, cid)[-1]
    assert end["event"] == "console-end" and end["exit_status"] is None, end
    starts = [x for x in _audit(containerd, cid) if x["event"] == "console-start"]
    assert starts[0]["terminal"] is True and starts[0]["tty"].startswith("/dev/pts/"), starts


def test_kill_and_a_vanished_client_end_sessions(containerd: Containerd, node: Opsd,
                                                 pod: tuple[str, int]) -> None:
    cid, _ = pod
    assert opsctl(node.socket, "console", "enable", cid).returncode == 0

    def session(script: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(node.socket),
                                 "console", cid, "--", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)

    def listed() -> list[dict[str, Any]]:
        r = opsctl(node.socket, "console", "ls", "--json")
        assert r.returncode == 0, r
        return list(json.loads(r.stdout))

    # opsctl console kill: the session's processes die, opsctl gets its end and status.
    victim = session("echo up; sleep 1000")
    wait_for(lambda: len(listed()) == 1, 30, "the session to be listed")
    [row] = listed()
    assert (row["sandbox"], row["argv"], row["uid"], row["pid"]) == (
        cid, ["sh", "-c", "echo up; sleep 1000"], 0, victim.pid), row
    r = opsctl(node.socket, "console", "kill", row["id"])
    assert (r.returncode, r.stdout.strip()) == (0, f"console session {row['id']} ended"), r
    out, err = victim.communicate(timeout=30)
    assert (victim.returncode, out) == (137, "up\n"), (out, err)
    r = opsctl(node.socket, "console", "kill", row["id"])
    assert r.returncode == 1 and "no open console session" in r.stderr, r

    # opsctl SIGKILLed: opsd sees the stream break and ends the session.
    gone = session("echo up; sleep 1000")
    wait_for(lambda: len(listed()) == 1, 30, "the session to be listed")
    gone.kill()
    gone.communicate(timeout=30)
    wait_for(lambda: not listed(), 30, "the orphaned session to be reaped")
    ends = [x for x in _audit(containerd, cid) if x["event"] == "console-end"]
    assert [(x["reason"], x["exit_status"]) for x in ends] == [
        ("killed by uid 0 (opsctl console kill)", 137), ("the client went away", None)], ends
    agent_log = SandboxDir.of(containerd.paths.tmp_root / "keel", cid).agent_log
    assert agent_log.read_text().count("killed pid") >= 1


def test_a_reader_that_stops_holds_the_session_back_not_the_memory(
        containerd: Containerd, node: Opsd, pod: tuple[str, int]) -> None:
    """opsctl's stdout is a pipe nobody reads for a while, and the session
    prints 5.9 MB: the bytes wait in the remote command (it blocks), not in
    opsd, the shim or opsctl, whose memory stays within a few MiB; once the
    reader drains the pipe every line arrives once and in order."""
    from tests.containerd import rss_mib
    from tests.integration.keel_ctr import shim_pid

    cid, _ = pod
    assert opsctl(node.socket, "console", "enable", cid).returncode == 0
    lines = 800_000  # `seq 800000`: 5,888,896 bytes
    reader = subprocess.Popen([sys.executable, "-m", "opsd.cli", "--socket", str(node.socket),
                               "console", cid, "--", "seq", str(lines)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    procs = {"opsd": node.proc.pid, "shim": shim_pid(containerd, cid), "opsctl": reader.pid}
    def sent() -> int:
        r = opsctl(node.socket, "console", "ls", "--json")
        return sum(int(x["bytes_out"]) for x in json.loads(r.stdout) if x["sandbox"] == cid)

    time.sleep(2.0)  # the session runs; the pipe (64 KiB) fills at once
    before = {name: rss_mib(pid) for name, pid in procs.items()}
    peak, sent_before = dict(before), sent()
    for _ in range(10):  # 5 s of nobody reading: at 1 MiB/s it would all have been sent
        time.sleep(0.5)
        for name, pid in procs.items():
            peak[name] = max(peak[name], rss_mib(pid))
    sent_after = sent()
    print(f"[console] sent while stalled: {sent_before} -> {sent_after} bytes; rss {before} -> {peak}")
    assert reader.poll() is None  # still held back by its stdout
    # Held back: what opsd sent while nobody read is the streams' windows, not 5 s of output.
    assert sent_after - sent_before < 1 << 20, (sent_before, sent_after)
    assert sent_after < lines * 7 // 2, sent_after
    grew = {name: peak[name] - before[name] for name in procs}
    assert all(mib <= 8 for mib in grew.values()), (before, peak)
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    got = out.split(b"\n")
    assert got[-1] == b"" and [int(x) for x in got[:-1]] == list(range(1, lines + 1))
