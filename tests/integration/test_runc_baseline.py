"""Reference baseline: the stock `io.containerd.runc.v2` under the private containerd.

These prove the fixture (private containerd, imported busybox image, ctr
and pty helpers) and record what containerd + runc do, so the Keel shim's
tests can be read against them: same commands, same expected results.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.containerd import Containerd, wait_for
from tests.integration.keel_ctr import listed, status

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]

RUNC = "io.containerd.runc.v2"


def test_run_rm_output_and_exit_code(containerd: Containerd, busybox: str,
                                     container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr("run", "--rm", "--runtime", RUNC, busybox, cid,
                         "sh", "-c", "echo hi; echo err >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, "hi\n", "err\n")
    assert not listed(containerd, "tasks", cid)
    assert not listed(containerd, "containers", cid)


def test_run_rm_stdin_reaches_the_process(containerd: Containerd, busybox: str,
                                          container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    # Fed once the task runs: ctr 1.6 loses stdin EOF that comes before the task exists.
    res = containerd.ctr_feed("run", "--rm", "--runtime", RUNC, busybox, cid, "wc", "-l",
                              input="one\ntwo\nthree\n",
                              when=lambda: status(containerd, cid) == "RUNNING")
    assert (res.returncode, res.stdout.strip(), res.stderr) == (0, "3", "")


def test_detached_exec_kill_delete(containerd: Containerd, busybox: str,
                                   container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr("run", "-d", "--runtime", RUNC, busybox, cid, "sleep", "1000")
    assert res.returncode == 0, res.stderr
    task = containerd.task(cid)
    assert task is not None and task[0] > 0 and task[1] == "RUNNING", task

    res = containerd.ctr("tasks", "exec", "--exec-id", "e1", cid,
                         "sh", "-c", "echo from-exec; echo $$; exit 4")
    assert res.returncode == 4, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "from-exec" and int(out[1]) > 1, res.stdout  # exec is not PID 1
    assert len(containerd.ctr("tasks", "ps", cid).stdout.splitlines()) == 2  # header + init

    res = containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: containerd.task(cid) == (task[0], "STOPPED"), 10, f"{cid} to stop")

    res = containerd.ctr("tasks", "rm", cid)
    # ctr task rm succeeds and only warns about the status (128 + SIGKILL).
    assert (res.returncode, res.stdout) == (0, ""), res
    assert "exit with non-zero exit code 137" in res.stderr, res.stderr
    assert not listed(containerd, "tasks", cid)
    res = containerd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr
    assert not listed(containerd, "containers", cid)


def test_run_tty(containerd: Containerd, busybox: str,
                 container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr_pty("run", "--rm", "-t", "--runtime", RUNC, busybox, cid,
                             "sh", "-c", "tty; echo tty-ok; exit 5", timeout=30)
    # Both ptys translate "\n": the container's to "\r\n", ctr's (ours) once more.
    # (No `stty size` here: ctr sends ResizePty only after Start, so it races.)
    lines = res.output.replace("\r", "").splitlines()
    assert res.returncode == 5, res.output
    assert lines == ["/dev/pts/0", "tty-ok"], res.output


def test_run_tty_interactive(containerd: Containerd, busybox: str,
                             container_ids: Callable[[], str]) -> None:
    cid = container_ids()
    res = containerd.ctr_pty("run", "--rm", "-t", "--runtime", RUNC, busybox, cid, "sh",
                             input="echo $((6*7)); exit 7\n", timeout=30)
    assert res.returncode == 7, res.output
    assert "42" in res.output.replace("\r", "").splitlines(), res.output
