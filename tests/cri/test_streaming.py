"""Streaming Exec, Attach and PortForward through containerd's CRI stream
server (the WebSocket protocol, tests/cri/streaming.py), as ``kubectl exec
-i``, ``kubectl attach`` and ``kubectl port-forward`` reach a pod: the same
sessions and the same expected answers for every handler."""

from __future__ import annotations

import pytest

from tests.containerd import wait_for
from tests.cri.client import pb
from tests.cri.kubelet import SERVER, Kubelet, handlers
from tests.cri.streaming import (
    STDERR,
    PortForward,
    StreamClient,
    attach_url,
    exec_url,
    port_forward_url,
)

pytestmark = [pytest.mark.integration, pytest.mark.requires_root, pytest.mark.slow]

EXITED = pb.ContainerState.CONTAINER_EXITED


@pytest.mark.parametrize("handler", handlers())
def test_exec_stream_stdin_output_and_exit_code(kubelet: Kubelet, handler: str) -> None:
    """``kubectl exec -i``: stdin reaches the command, stdout and stderr come
    apart, and the exit code comes back in the session's status."""
    pod = kubelet.run_pod()
    cid = kubelet.run(pod, "app")
    netns = kubelet.node.netns.path
    s = StreamClient(netns, exec_url(kubelet, cid, [
        "sh", "-c", "read line; echo got:$line; echo err >&2; exit 4"], stdin=True))
    s.send(b"hello\n")
    done = s.finish()
    assert (done.stdout, done.stderr, done.exit_code) == (b"got:hello\n", b"err\n", 4), done
    done = StreamClient(netns, exec_url(kubelet, cid, ["sh", "-c", "echo fine"])).finish()
    assert (done.stdout, done.exit_code) == (b"fine\n", 0), done


#: Waits for the typed line, then for the size the client set (the stream
#: server applies a resize asynchronously; 0 0 until then), for 10 s at most.
TTY_SCRIPT = ('read go; i=0; s=""; until [ -n "$s" ] && [ "$s" != "0 0" ]; do '
              '[ $i -gt 100 ] && exit 9; i=$((i+1)); usleep 100000; s=$(stty size 2>/dev/null); '
              'done; echo "size $s"; test -t 0 && echo is-a-tty')


@pytest.mark.parametrize("handler", handlers())
def test_exec_stream_with_a_terminal_and_resize(kubelet: Kubelet, handler: str) -> None:
    """``kubectl exec -it``: the command has a terminal of the size the
    client sets, and what is typed is echoed."""
    pod = kubelet.run_pod()
    cid = kubelet.run(pod, "app")
    s = StreamClient(kubelet.node.netns.path, exec_url(
        kubelet, cid, ["sh", "-c", TTY_SCRIPT], stdin=True, tty=True))
    s.resize(123, 45)
    s.send(b"go\r")
    done = s.finish()
    out = done.stdout.replace(b"\r\n", b"\n")
    assert b"go\n" in out, out  # the terminal echoed it
    assert b"size 45 123\nis-a-tty\n" in out, (out, done.messages)
    assert (done.stderr, done.exit_code) == (b"", 0), done


@pytest.mark.parametrize("handler", handlers())
def test_attach_to_a_container_reading_stdin(kubelet: Kubelet, handler: str) -> None:
    """``kubectl attach -i``: the container's own stdin and stdout, live; its
    exit ends the session, and what it wrote is in its CRI log too."""
    pod = kubelet.run_pod()
    config = kubelet.container_config("shell", ["sh"])
    config.stdin = True
    cid = kubelet.create(pod, "shell", config=config)
    kubelet.start(cid)
    s = StreamClient(kubelet.node.netns.path, attach_url(kubelet, cid))
    s.send(b"echo attached-$((6*7))\n")
    s.read_until(b"attached-42\n")
    s.send(b"echo bye >&2\n")
    # Seen before the exit: containerd may end an attach session before it
    # forwards what the container wrote just before exiting (seen once on runc).
    s.read_until(b"bye\n", channel=STDERR)
    s.send(b"exit 5\n")
    done = s.finish()
    assert done.stderr == b"bye\n", done
    status = kubelet.wait_state(cid, EXITED)
    assert status.exit_code == 5, status
    log = (pod.log_dir / "shell" / "0.log").read_text()
    assert " stdout F attached-42\n" in log and " stderr F bye\n" in log, log


@pytest.mark.parametrize("handler", handlers())
def test_port_forward_reaches_a_server_in_the_pod(kubelet: Kubelet, handler: str) -> None:
    """``kubectl port-forward``: bytes reach a server listening in the pod on
    localhost:8080, and its answer comes back.  (For a VM pod through the
    shim's relay on the pod's host-side localhost: shim/_portforward.py.)"""
    pod = kubelet.run_pod()
    server = kubelet.run(pod, "server", SERVER)
    netns = kubelet.node.netns.path

    def listening() -> bool:
        r = kubelet.exec_sync(server, "sh", "-c", "netstat -ltn | grep -c ':8080 '")
        return r.stdout.strip() == b"1"

    wait_for(listening, 30, "the server to listen on 8080")
    forward = PortForward(netns, port_forward_url(kubelet, pod.id, 8080), 8080)
    try:
        forward.send(b"ping\n")
        assert forward.receive_until(b"pong\n") == b"pong\n"
    finally:
        forward.close()
    got = wait_for(lambda: kubelet.exec_sync(server, "cat", "/tmp/got").stdout, 10,
                   "the server to record the request")
    assert got == b"ping\n"
