"""The kubelet's side of the CRI, for one test and one runtime handler.

`Kubelet` builds pod and container configs the way the kubelet does for a
plain pod (network and IPC shared by the pod, a PID namespace per
container, logs under ``<pods>/<ns>_<name>_<uid>/<container>/0.log``, the
node's cgroup parent), makes the calls, and remembers every pod it ran.
`Kubelet.cleanup` stops and removes them (StopPodSandbox kills what is
still running) and reports what is left: pods CRI still lists and
processes, mounts or sockets of the node that outlived them.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status

from tests.containerd import force_cleanup, wait_for
from tests.cri.client import GRPCError, pb
from tests.cri.node import CriNode
from tests.images.busybox import BUSYBOX_REF

#: The namespaces of a plain pod, as the kubelet sends them.
POD_NAMESPACES = pb.NamespaceOption(network=pb.NamespaceMode.POD, pid=pb.NamespaceMode.CONTAINER,
                                    ipc=pb.NamespaceMode.POD)
K8S_NAMESPACE = "keel-cri"
#: A workload that runs until it is stopped: SIGTERM ends it with 0.
#: (`sleep & wait` so that the trap runs at once, not after the sleep.)
IDLE = ("sh", "-c", 'trap "exit 0" TERM; while :; do sleep 1 & wait $!; done')
#: Serves one connection on 8080 (answers "pong", keeps what it got), then idles.
SERVER = ("sh", "-c", "echo pong | nc -l -p 8080 > /tmp/got; "
          'trap "exit 0" TERM; while :; do sleep 1 & wait $!; done')
#: How long a pod and its containers may take to go away.
LEFTOVER_GRACE_S = 15.0


def handlers(*, keel_xfail: str = "", vm_xfail: str = "") -> list[Any]:
    """Values of a case's ``handler`` parameter: ``runc``, ``keel`` (the
    process backend), then ``keel-vm`` (the qemu backend, marked ``vm``).

    `keel_xfail` (`vm_xfail`) names the exact symptom of a Keel bug that
    makes that case fail where runc passes; it is then a strict xfail, so
    it turns into a failure the day the bug is fixed.
    """
    def xfail(reason: str) -> tuple[Any, ...]:
        return (pytest.mark.xfail(strict=True, reason=reason),) if reason else ()

    return ["runc", pytest.param("keel", marks=xfail(keel_xfail)),
            pytest.param("keel-vm", marks=(pytest.mark.vm, pytest.mark.slow, *xfail(vm_xfail)))]


@dataclass(frozen=True, slots=True)
class Pod:
    id: str
    config: pb.PodSandboxConfig

    @property
    def log_dir(self) -> Path:
        return Path(self.config.log_directory)


class Kubelet:
    """Pods and containers of one test on one handler (``runc`` or ``keel``)."""

    def __init__(self, node: CriNode, handler: str, test_name: str) -> None:
        self.node = node
        self.handler = handler
        self.cri = node.client
        self._rt = node.client.runtime
        # Pod names become hostnames: DNS labels of at most 63 characters.
        slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower().removeprefix("test_")).strip("-")
        self._prefix = f"{handler}-{slug}"[:45].strip("-")
        self._serial = itertools.count(1)
        self._pods: list[str] = []

    # --- pods -----------------------------------------------------------------

    def pod_config(self, name: str = "pod") -> pb.PodSandboxConfig:
        """A fresh config (new uid and log directory) for a plain pod named `name`."""
        pod_name = f"{self._prefix}-{name}-{next(self._serial)}"[-63:].strip("-")
        uid = str(uuid.uuid4())
        log_dir = self.node.pod_logs / f"{K8S_NAMESPACE}_{pod_name}_{uid}"
        log_dir.mkdir(parents=True)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=pod_name, uid=uid, namespace=K8S_NAMESPACE),
            hostname=pod_name,
            log_directory=str(log_dir),
            labels={"keel.test/case": self._prefix},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=self.node.cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=POD_NAMESPACES)),
        )

    def run_pod(self, name: str = "pod", config: pb.PodSandboxConfig | None = None) -> Pod:
        config = config or self.pod_config(name)
        answer = self.cri.call(self._rt.run_pod_sandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=self.handler)))
        self._pods.append(answer.pod_sandbox_id)
        return Pod(answer.pod_sandbox_id, config)

    def pod_status(self, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
        return self.cri.call(self._rt.pod_sandbox_status(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)))

    def stop_pod(self, pod_id: str) -> None:
        self.cri.call(self._rt.stop_pod_sandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id)))

    def remove_pod(self, pod_id: str) -> None:
        self.cri.call(self._rt.remove_pod_sandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id)))

    def pods(self) -> list[pb.PodSandbox]:
        """Every pod CRI lists (of any test)."""
        return self.cri.call(self._rt.list_pod_sandbox(pb.ListPodSandboxRequest())).items

    # --- containers -----------------------------------------------------------

    def container_config(self, name: str, command: Sequence[str], *,
                         envs: Mapping[str, str] | None = None,
                         security: pb.LinuxContainerSecurityContext | None = None,
                         resources: pb.LinuxContainerResources | None = None,
                         ) -> pb.ContainerConfig:
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=BUSYBOX_REF),
            command=list(command),
            envs=[pb.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
            log_path=f"{name}/0.log",
            linux=pb.LinuxContainerConfig(
                resources=resources or pb.LinuxContainerResources(),
                security_context=security or pb.LinuxContainerSecurityContext(
                    namespace_options=POD_NAMESPACES)),
        )

    def create(self, pod: Pod, name: str, command: Sequence[str] = IDLE,
               config: pb.ContainerConfig | None = None) -> str:
        config = config or self.container_config(name, command)
        answer = self.cri.call(self._rt.create_container(pb.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)))
        return answer.container_id

    def start(self, cid: str) -> None:
        self.cri.call(self._rt.start_container(pb.StartContainerRequest(container_id=cid)))

    def run(self, pod: Pod, name: str, command: Sequence[str] = IDLE) -> str:
        """Create and start a container; return its id."""
        cid = self.create(pod, name, command)
        self.start(cid)
        return cid

    def status(self, cid: str, verbose: bool = False) -> pb.ContainerStatusResponse:
        return self.cri.call(self._rt.container_status(
            pb.ContainerStatusRequest(container_id=cid, verbose=verbose)))

    def wait_state(self, cid: str, state: pb.ContainerState,
                   timeout: float = 30.0) -> pb.ContainerStatus:
        """Poll ContainerStatus until the container is in `state`; return that status."""
        def reached() -> pb.ContainerStatus | None:
            status = self.status(cid).status
            return status if status.state == state else None

        status = wait_for(reached, timeout, f"container {cid[:12]} to be {state.name}")
        assert status is not None  # wait_for returns a truthy value
        return status

    def stop(self, cid: str, timeout: int) -> None:
        self.cri.call(self._rt.stop_container(
            pb.StopContainerRequest(container_id=cid, timeout=timeout)))

    def remove(self, cid: str) -> None:
        self.cri.call(self._rt.remove_container(pb.RemoveContainerRequest(container_id=cid)))

    def exec_sync(self, cid: str, *cmd: str, timeout: int = 0) -> pb.ExecSyncResponse:
        return self.cri.call(self._rt.exec_sync(
            pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout)))

    def update_resources(self, cid: str, resources: pb.LinuxContainerResources) -> None:
        self.cri.call(self._rt.update_container_resources(
            pb.UpdateContainerResourcesRequest(container_id=cid, linux=resources)))

    def reopen_log(self, cid: str) -> None:
        self.cri.call(self._rt.reopen_container_log(
            pb.ReopenContainerLogRequest(container_id=cid)))

    def stats(self, cid: str) -> pb.ContainerStats:
        return self.cri.call(self._rt.container_stats(
            pb.ContainerStatsRequest(container_id=cid))).stats

    def list_stats(self, pod_id: str) -> list[pb.ContainerStats]:
        return self.cri.call(self._rt.list_container_stats(pb.ListContainerStatsRequest(
            filter=pb.ContainerStatsFilter(pod_sandbox_id=pod_id)))).stats

    # --- teardown -------------------------------------------------------------

    def vm_logs(self, limit: int = 3000) -> str:
        """The guest console and qemu's log of this test's VM pods (what a
        failed keel-vm case needs to be understood)."""
        parts = []
        for pod_id in self._pods:
            sandbox = self.node.keel_state / "sandboxes" / pod_id
            for name in ("agent.log", "vmm.log"):
                path = sandbox / name
                if path.exists():
                    text = path.read_text(errors="replace")[-limit:]
                    parts.append(f"--- pod {pod_id[:12]} {name} ---\n{text}")
        return "\n".join(parts)

    def cleanup(self) -> list[str]:
        """Stop and remove this test's pods; return what went wrong or is left."""
        problems = []
        for pod_id in self._pods:
            for step in (self.stop_pod, self.remove_pod):
                try:
                    step(pod_id)
                except GRPCError as exc:
                    if exc.status is not Status.NOT_FOUND:  # already gone: fine
                        problems.append(f"{step.__name__} {pod_id[:12]}: {exc.status.name} "
                                        f"{exc.message}")
        listed = {p.id for p in self.pods()} & set(self._pods)
        problems += [f"pod {pod_id[:12]} still listed" for pod_id in sorted(listed)]
        found = self.node.containerd.leftovers(grace=LEFTOVER_GRACE_S)
        if found:
            problems.append(f"left behind:\n{found}")
            force_cleanup(found)
        return problems
