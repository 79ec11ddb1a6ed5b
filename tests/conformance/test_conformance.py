"""What every sandbox backend must do the same way, through containerd and ``ctr``.

Each scenario runs once per backend (conftest.py: ``process``, ``qemu``):
``ctr run --rm`` output and exit code, ``ctr tasks exec`` exit code and
output, stdin reaching the process, a TTY.  The expected results are the
same for every backend; only the time allowed differs (a VM under TCG
boots in tens of seconds).
"""

from __future__ import annotations

import itertools
import os
import re

import pytest

from tests.containerd import Containerd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]

KEEL = "io.containerd.keel.v2"
BUSYBOX = "localhost/keel/busybox:test"
#: Seconds one ctr command may take (a qemu sandbox boots a VM first).
CTR_TIMEOUT_S = 240.0
_ids = itertools.count(1)


def _cid(tag: str) -> str:
    return f"conf-{tag}-{os.getpid()}-{next(_ids)}"


def _task(ctd: Containerd, cid: str) -> tuple[int, str] | None:
    for line in ctd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1]), fields[2]
    return None


def _listed(ctd: Containerd, kind: str, cid: str) -> bool:
    return cid in ctd.ctr(kind, "ls", "-q").stdout.split()


def _run_detached(ctd: Containerd, cid: str, *args: str) -> int:
    res = ctd.ctr("run", "-d", "--runtime", KEEL, BUSYBOX, cid, *args, timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    task = wait_for(lambda: _task(ctd, cid), 30, f"{cid} to be listed")
    assert task[0] > 0 and task[1] == "RUNNING", task
    return task[0]


def _kill_and_remove(ctd: Containerd, cid: str) -> None:
    res = ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: (_task(ctd, cid) or (0, ""))[1] == "STOPPED", 60, f"{cid} to stop")
    res = ctd.ctr("tasks", "rm", cid, timeout=CTR_TIMEOUT_S)
    assert res.returncode == 0 and "exit with non-zero exit code 137" in res.stderr, res
    res = ctd.ctr("containers", "rm", cid)
    assert res.returncode == 0, res.stderr


def _no_leftovers(ctd: Containerd, cid: str) -> None:
    assert not _listed(ctd, "tasks", cid) and not _listed(ctd, "containers", cid)
    found = ctd.leftovers(grace=20.0)
    assert not found, f"left behind:\n{found}"


def test_run_rm_output_and_exit_code(ctd: Containerd) -> None:
    cid = _cid("rm")
    res = ctd.ctr("run", "--rm", "--runtime", KEEL, BUSYBOX, cid,
                  "sh", "-c", "echo hello; echo err >&2; exit 3", timeout=CTR_TIMEOUT_S)
    assert (res.returncode, res.stdout, res.stderr) == (3, "hello\n", "err\n"), res
    _no_leftovers(ctd, cid)


def test_exec_output_and_exit_code(ctd: Containerd) -> None:
    cid = _cid("exec")
    _run_detached(ctd, cid, "sleep", "1000")
    try:
        res = ctd.ctr("tasks", "exec", "--exec-id", "e1", cid,
                      "sh", "-c", "echo from-exec; echo $$; exit 4", timeout=CTR_TIMEOUT_S)
        assert res.returncode == 4, res
        out = res.stdout.splitlines()
        assert out[0] == "from-exec" and int(out[1]) > 1, res.stdout  # an exec is not PID 1
        res = ctd.ctr("tasks", "exec", "--exec-id", "e2", cid, "true", timeout=CTR_TIMEOUT_S)
        assert res.returncode == 0, res
    finally:
        _kill_and_remove(ctd, cid)
    _no_leftovers(ctd, cid)


def test_stdin_reaches_the_process(ctd: Containerd) -> None:
    cid = _cid("stdin")
    data = "one\ntwo\nthree\n" * 1000
    res = ctd.ctr_feed("run", "--rm", "--runtime", KEEL, BUSYBOX, cid,
                       "sh", "-c", "wc -l -c; exit 6", input=data,
                       when=lambda: (_task(ctd, cid) or (0, ""))[1] == "RUNNING",
                       timeout=CTR_TIMEOUT_S)
    assert res.returncode == 6, res
    assert res.stdout.split() == ["3000", str(len(data))], res.stdout
    _no_leftovers(ctd, cid)


def test_tty(ctd: Containerd) -> None:
    cid = _cid("tty")
    res = ctd.ctr_pty("run", "--rm", "-t", "--runtime", KEEL, BUSYBOX, cid, "sh",
                      input="tty; echo $((6*7)); exit 7\n", timeout=CTR_TIMEOUT_S)
    lines = res.output.replace("\r", "").splitlines()
    assert res.returncode == 7, res.output
    assert "42" in lines, res.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in lines), res.output
    _no_leftovers(ctd, cid)
