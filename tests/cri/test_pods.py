"""Pods and containers through their lifecycle, and their logs, as the kubelet
drives them: the same calls and the same expected answers for handler
``runc`` and handler ``keel``."""

from __future__ import annotations

import ipaddress
import os
import re
import time

import pytest
from grpclib.const import Status

from shim.dirs import MAX_STATE_ROOT, SandboxDir
from tests.containerd import wait_for
from tests.cri import node as cri
from tests.cri.client import error_of, pb
from tests.cri.kubelet import Kubelet, Pod, handlers
from tests.cri.network import GATEWAY, POD_SUBNET

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

READY = pb.PodSandboxState.SANDBOX_READY
NOTREADY = pb.PodSandboxState.SANDBOX_NOTREADY
CREATED = pb.ContainerState.CONTAINER_CREATED
RUNNING = pb.ContainerState.CONTAINER_RUNNING
EXITED = pb.ContainerState.CONTAINER_EXITED
#: Runs until stopped; says "started" once its SIGTERM trap is in place.
TRAPS_TERM = ("sh", "-c", 'trap "exit 3" TERM; echo started; while :; do sleep 1 & wait $!; done')
IGNORES_TERM = ("sh", "-c", 'trap "" TERM; echo started; while :; do sleep 1 & wait $!; done')
#: One CRI log line: RFC 3339 time, stream, P(artial) or F(ull), content.
LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) "
                      r"(stdout|stderr) ([PF]) (.*)")
#: containerd's default max_container_log_line_size.
MAX_LOG_LINE = 16 * 1024


def log_entries(path: str) -> list[tuple[str, str, str]]:
    """(stream, tag, content) of every line of a CRI log file; asserts the format."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            m = LOG_LINE.fullmatch(line)
            assert m, f"not a CRI log line: {line[:200]!r}"
            entries.append((m[2], m[3], m[4]))
    return entries


def log_lines(entries: list[tuple[str, str, str]], stream: str) -> list[str]:
    """The lines `stream` wrote: P entries joined to the F entry that ends them."""
    lines, partial = [], ""
    for s, tag, content in entries:
        if s != stream:
            continue
        partial += content
        if tag == "F":
            lines.append(partial)
            partial = ""
    return lines + ([partial] if partial else [])


def wait_logged(pod: Pod, name: str, text: str) -> None:
    path = pod.log_dir / name / "0.log"
    wait_for(lambda: path.exists() and text in path.read_text(), 30,
             f"{text!r} in {name}'s log")


@pytest.mark.parametrize("handler", handlers())
def test_pod_runs_reports_stops_and_is_removed(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    assert re.fullmatch(r"[0-9a-f]{64}", pod.id), pod.id
    status = kubelet.pod_status(pod.id).status
    assert status.state == READY
    assert status.runtime_handler == handler
    assert (status.metadata.name, status.metadata.uid) == (pod.config.metadata.name,
                                                           pod.config.metadata.uid)
    ip = ipaddress.ip_address(status.network.ip)
    assert ip in POD_SUBNET and ip != GATEWAY, status.network.ip
    assert pod.id in {p.id for p in kubelet.pods()}

    kubelet.stop_pod(pod.id)
    assert kubelet.pod_status(pod.id).status.state == NOTREADY
    kubelet.stop_pod(pod.id)  # idempotent
    kubelet.remove_pod(pod.id)
    assert error_of(lambda: kubelet.pod_status(pod.id)).status is Status.NOT_FOUND
    assert pod.id not in {p.id for p in kubelet.pods()}
    kubelet.remove_pod(pod.id)  # idempotent


@pytest.mark.parametrize("handler", handlers())
def test_container_create_start_stop_remove(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    cid = kubelet.create(pod, "app", TRAPS_TERM)
    status = kubelet.status(cid).status
    assert (status.state, status.metadata.name) == (CREATED, "app")
    assert status.created_at > 0 and status.started_at == 0
    assert status.log_path == str(pod.log_dir / "app" / "0.log")

    kubelet.start(cid)
    status = kubelet.status(cid).status
    assert status.state == RUNNING and status.started_at >= status.created_at
    wait_logged(pod, "app", "started")

    t0 = time.monotonic()
    kubelet.stop(cid, timeout=30)
    took = time.monotonic() - t0
    status = kubelet.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (EXITED, 3, "Error")
    assert status.finished_at >= status.started_at
    assert took < 10, f"StopContainer took {took:.1f}s; the TERM trap should end it at once"
    kubelet.stop(cid, timeout=30)  # idempotent on an exited container

    kubelet.remove(cid)
    assert error_of(lambda: kubelet.status(cid)).status is Status.NOT_FOUND


@pytest.mark.parametrize("handler", handlers())
def test_stop_escalates_to_sigkill(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    cid = kubelet.run(pod, "stubborn", IGNORES_TERM)
    wait_logged(pod, "stubborn", "started")
    t0 = time.monotonic()
    kubelet.stop(cid, timeout=1)
    took = time.monotonic() - t0
    status = kubelet.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (EXITED, 137, "Error")
    assert 1 <= took < 10, f"StopContainer(timeout=1) took {took:.1f}s"


@pytest.mark.parametrize("handler", handlers())
def test_exit_codes_and_reasons(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    ok = kubelet.run(pod, "ok", ("sh", "-c", "exit 0"))
    bad = kubelet.run(pod, "bad", ("sh", "-c", "exit 7"))
    done = kubelet.wait_state(ok, EXITED)
    assert (done.exit_code, done.reason) == (0, "Completed")
    done = kubelet.wait_state(bad, EXITED)
    assert (done.exit_code, done.reason) == (7, "Error")
    # Not finished_at >= started_at: CRI stamps started_at when Start returns,
    # which may come after a command this short has already exited.
    assert done.started_at > 0 and done.finished_at >= done.created_at


@pytest.mark.parametrize("handler", handlers())
def test_logs_in_cri_format_at_log_path(kubelet: Kubelet, handler: str) -> None:
    pod = kubelet.run_pod()
    script = ("echo one; echo two >&2; echo three; "
              "head -c 20000 /dev/zero | tr '\\0' x; echo; printf no-newline")
    cid = kubelet.run(pod, "logger", ("sh", "-c", script))
    status = kubelet.wait_state(cid, EXITED)
    assert status.exit_code == 0
    entries = log_entries(status.log_path)
    assert log_lines(entries, "stdout") == ["one", "three", "x" * 20000, "no-newline"], entries
    assert log_lines(entries, "stderr") == ["two"]
    # The long line arrives split, as partial entries of at most the maximum size.
    long_line = [e for e in entries if e[2].startswith("x")]
    assert [tag for _, tag, _ in long_line][:-1] == ["P"] * (len(long_line) - 1)
    assert len(long_line) >= 2 and all(len(c) <= MAX_LOG_LINE for _, _, c in long_line)



def test_pod_under_the_longest_state_root(long_root_node: cri.CriNode) -> None:
    """RunPodSandbox (64-character ids) with Keel's state root as long as
    Keel allows: the sandbox's sockets move to ``<root>/c/<hash>/``, a
    container runs and answers ExecSync, and removing the pod leaves nothing."""
    root = long_root_node.keel_state
    assert len(os.fsencode(root)) == MAX_STATE_ROOT
    kubelet = Kubelet(long_root_node, "keel", "test_pod_under_the_longest_state_root")
    try:
        pod = kubelet.run_pod()
        sandbox = SandboxDir.of(root, pod.id)
        assert len(pod.id) == 64 and sandbox.root.is_dir()
        assert sandbox.sockets_dir.parent == root / "c" and sandbox.ops_socket.is_socket()
        cid = kubelet.run(pod, "app")
        assert len(cid) == 64
        res = kubelet.exec_sync(cid, "sh", "-c", "echo ok; exit 3")
        assert (res.exit_code, res.stdout) == (3, b"ok\n"), res
        kubelet.stop_pod(pod.id)
        kubelet.remove_pod(pod.id)
        assert not sandbox.root.exists() and not sandbox.sockets_dir.exists()
    finally:
        problems = kubelet.cleanup()
    assert not problems, "\n".join(problems)
