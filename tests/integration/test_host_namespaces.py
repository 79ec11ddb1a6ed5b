"""Pods that share the host's namespaces or mounts: honoured as runc does, or refused.

Kubernetes' hostNetwork, hostIPC and hostPID reach a runtime as an OCI
spec that does not list that namespace (OCI: an unlisted type is the
runtime's own); mountPropagation as ``rslave``/``rshared`` mount options.
Each case runs on runc and on Keel's process backend with the same
command.  Keel must give the same outcome, or refuse with a clear error
where it cannot (rshared); it never runs the pod isolated as if
nothing had been asked.  The qemu backend refuses all of them (tests/unit,
tests/vm).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.containerd import Containerd, wait_for
from tests.integration.keel_ctr import KEEL, listed

pytestmark = [pytest.mark.integration, pytest.mark.requires_root]

RUNC = "io.containerd.runc.v2"
RUNTIMES = pytest.mark.parametrize("runtime", [RUNC, KEEL], ids=["runc", "keel"])


def _ns(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


def _spec(ctd: Containerd, cid: str, tmp: Path, drop: tuple[str, ...], *args: str,
          mounts: tuple[dict[str, object], ...] = (), rootfs_propagation: str = "") -> Path:
    """ctr's default spec for *args* on a busybox rootfs of its own, less the
    namespace types in *drop*, plus *mounts* (``ctr run --config`` takes it)."""
    from tests.agent_harness import make_rootfs

    res = ctd.ctr("oci", "spec")
    assert res.returncode == 0, res.stderr
    spec = json.loads(res.stdout)
    make_rootfs(tmp / f"{cid}-rootfs")
    spec["root"] = {"path": str(tmp / f"{cid}-rootfs")}
    spec["process"]["args"] = list(args)
    spec["process"]["env"] = ["PATH=/bin"]  # ctr's default spec has none
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                   if n["type"] not in drop]
    spec["linux"]["cgroupsPath"] = f"/{ctd.namespace}/{cid}"
    spec["mounts"] += list(mounts)
    if rootfs_propagation:
        spec["linux"]["rootfsPropagation"] = rootfs_propagation
    path = tmp / f"{cid}.json"
    path.write_text(json.dumps(spec))
    return path


def _run(ctd: Containerd, runtime: str, *args: str) -> subprocess.CompletedProcess[str]:
    return ctd.ctr("run", "--rm", "--runtime", runtime, *args)


def _gone(ctd: Containerd, cid: str) -> None:
    ctd.ctr("containers", "rm", cid)
    assert not listed(ctd, "tasks", cid) and not listed(ctd, "containers", cid)


@RUNTIMES
def test_host_network(containerd: Containerd, busybox: str, container_ids: Callable[[], str],
                      runtime: str) -> None:
    cid = container_ids()
    res = _run(containerd, runtime, "--net-host", busybox, cid, "readlink", "/proc/self/ns/net")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == _ns("net")
    _gone(containerd, cid)


@RUNTIMES
def test_host_ipc_and_uts(containerd: Containerd, busybox: str,
                          container_ids: Callable[[], str], tmp_path: Path,
                          runtime: str) -> None:
    cid, host_name = container_ids(), socket.gethostname()
    spec = _spec(containerd, cid, tmp_path, ("ipc", "uts"), "sh", "-c",
                 "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; hostname")
    res = _run(containerd, runtime, "--config", str(spec), cid)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [_ns("ipc"), _ns("uts"), host_name]
    assert socket.gethostname() == host_name  # the sandbox did not rename the host
    _gone(containerd, cid)


@RUNTIMES
def test_host_pid(containerd: Containerd, busybox: str, container_ids: Callable[[], str],
                  tmp_path: Path, runtime: str) -> None:
    cid = container_ids()
    spec = _spec(containerd, cid, tmp_path, ("pid",), "readlink", "/proc/self/ns/pid")
    res = _run(containerd, runtime, "--config", str(spec), cid)
    assert (res.returncode, res.stdout.strip()) == (0, _ns("pid")), res.stderr
    _gone(containerd, cid)


def test_host_pid_pod_is_stopped_without_its_agent(containerd: Containerd,
                                                   container_ids: Callable[[], str],
                                                   tmp_path: Path) -> None:
    """No PID namespace of its own: when the agent is SIGKILLed, the pod's
    processes (a container and a child it forked) die as they would with a
    PID 1, and deleting the task leaves nothing, through their cgroup."""
    cid = container_ids()
    pids = tmp_path / "pids"
    pids.mkdir()
    vol = {"destination": "/pids", "type": "bind", "source": str(pids), "options": ["rbind"]}
    spec = _spec(containerd, cid, tmp_path, ("pid",), "sh", "-c",
                 "sleep 1000 & echo $! > /pids/child; echo $$ > /pids/init; wait", mounts=(vol,))
    res = containerd.ctr("run", "-d", "--runtime", KEEL, "--config", str(spec), cid)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: (pids / "child").exists() and (pids / "init").exists(), 30,
             "the container to write its pids")
    pod = [int((pids / n).read_text()) for n in ("init", "child")]
    assert all(os.path.exists(f"/proc/{p}") for p in pod)  # host pids: hostPID
    agent = [p for p, cmd in containerd.leftovers().processes if "-m agent" in cmd]
    assert len(agent) == 1, containerd.leftovers().processes
    os.kill(agent[0], signal.SIGKILL)
    wait_for(lambda: not any(_alive(p) for p in pod), 30, "the pod's processes to die")
    wait_for(lambda: "STOPPED" in containerd.ctr("tasks", "ls").stdout, 30, f"{cid} stopped")
    res = containerd.ctr("tasks", "rm", "-f", cid)
    assert res.returncode == 0, res.stderr
    _gone(containerd, cid)
    found = containerd.leftovers(grace=10.0)
    assert not found, f"left behind:\n{found}"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that is a shared mount of its own (what rslave and rshared
    volumes need on the host), unmounted afterwards with what is under it."""
    path = tmp_path / "vol"
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-R", str(path)], check=False)


@RUNTIMES
def test_rslave_volume_sees_host_mounts_made_later(containerd: Containerd, busybox: str,
                                                   container_ids: Callable[[], str],
                                                   shared_dir: Path, runtime: str) -> None:
    cid = container_ids()
    later = shared_dir / "later"
    later.mkdir()
    wait = "until [ -e /vol/later/hello ]; do sleep 0.05; done; cat /vol/later/hello"
    ctr = subprocess.Popen(
        [*containerd.ctr_prefix(), "run", "--rm", "--runtime", runtime, "--mount",
         f"type=bind,src={shared_dir},dst=/vol,options=rbind:rslave", busybox, cid,
         "sh", "-c", wait], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: listed(containerd, "tasks", cid) or ctr.poll() is not None, 60,
                 f"{cid} to run")
        # A mount the host makes after the container started reaches it.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "later", str(later)],
                       check=True)
        (later / "hello").write_text("from a host mount made later\n")
        out, err = ctr.communicate(timeout=60)
    finally:
        if ctr.poll() is None:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
            ctr.wait(30)
    assert (ctr.returncode, out) == (0, "from a host mount made later\n"), err
    _gone(containerd, cid)


@RUNTIMES
def test_rshared_volume(containerd: Containerd, container_ids: Callable[[], str],
                        shared_dir: Path, tmp_path: Path, runtime: str) -> None:
    """A Bidirectional volume, as CRI writes it (rshared mount, rshared
    rootfs): runc propagates a mount made in the container to the host;
    Keel's process backend cannot (its mount tree is a slave) and refuses."""
    cid = container_ids()
    vol = {"destination": "/vol", "type": "bind", "source": str(shared_dir),
           "options": ["rbind", "rshared"]}
    spec = _spec(containerd, cid, tmp_path, (), "sh", "-c",
                 "mkdir -p /vol/made && mount -t tmpfs made /vol/made && echo ok",
                 mounts=(vol,), rootfs_propagation="rshared")
    doc = json.loads(spec.read_text())
    doc["process"]["capabilities"] = {k: ["CAP_SYS_ADMIN"] for k in
                                      ("bounding", "effective", "permitted")}
    spec.write_text(json.dumps(doc))
    res = _run(containerd, runtime, "--config", str(spec), cid)
    if runtime == RUNC:
        assert (res.returncode, res.stdout) == (0, "ok\n"), res.stderr
        assert os.path.ismount(shared_dir / "made")
    else:
        assert res.returncode != 0
        assert "asks for rshared mount propagation" in res.stderr, res.stderr
    _gone(containerd, cid)
