"""Upgrade a sandbox's agent in place, over the ops channel.

The agent execs the new release with the same PID (its containers stay
its children), writing its state first; the agent channel reconnects by
itself and the pumps resume at their offsets.  A release that fails in
the guest execs the previous one again: the answer says which runs now.

A VM runs its agent from its guest image, where a host release's path
means nothing.  When the target is an installed release on the host
(``<release>/bin/keel-agent``), its guest bundle
(shim/vmm/qemu/guest_release.py) is checked against the image the VM
booted and staged into the guest (OpsService.StageRelease) before the
agent is asked to exec it: a mismatch is refused before anything freezes.
A path that does not exist on the host is taken as a path in the guest.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from agent.api import STAGE_MAX_CHUNK, ops_pb
from keel.errors import FailedPrecondition, InvalidArgument, KeelError, Unimplemented
from keel.grpc import guest_text
from shim._agentconn import DialChannel, ops_call

if TYPE_CHECKING:
    from shim.sandbox import Sandbox
    from shim.vmm.qemu.guest_release import GuestRelease

log = logging.getLogger("keel.shim")

#: Seconds one Hello to an upgraded agent may go unanswered before the shim redials.
UPGRADE_HELLO_ATTEMPT_S = 30.0
#: Deadline of the UpgradeAgent call itself (the agent drains and writes its state).
UPGRADE_CALL_S = 60.0
#: Deadline of one StageRelease chunk (a 1 MiB write over virtio-serial, under TCG).
STAGE_CALL_S = 60.0


def _host_release(agent_path: str) -> Path | None:
    """The release directory of a host agent entry point (``<release>/bin/keel-agent``,
    links resolved), or None: a path that is not a file on the host is the guest's."""
    path = Path(agent_path)
    if not path.is_absolute() or not path.is_file():
        return None
    parents = path.resolve().parents
    return parents[1] if len(parents) > 1 else None


def _bundle(sb: Sandbox, agent_path: str) -> GuestRelease | None:
    """The guest bundle *sb*'s VM must receive to run *agent_path*, checked
    against the image it booted; None when the agent runs on the host or the
    path is the guest's.  FailedPrecondition naming what does not fit."""
    image = sb.vm.guest_image() if sb.vm is not None else None
    release_dir = _host_release(agent_path)
    if image is None or release_dir is None:
        return None
    from shim.vmm.qemu import guest_release  # a VM backend: already imported

    bundle = guest_release.load(release_dir)
    if why := guest_release.problem(bundle, image[1], image[0]):
        raise FailedPrecondition(why)
    return bundle


async def check_agent_release(sb: Sandbox, agent_path: str) -> str | None:
    """Why *sb*'s agent could not run the release of *agent_path*, or None.

    Reads only: the release's guest bundle against the VM's image, and
    whether the agent can receive a release at all (a StageRelease it must
    refuse as malformed; an agent older than StageRelease does not know it).
    """
    try:
        bundle = _bundle(sb, agent_path)
    except FailedPrecondition as exc:
        return str(exc)
    if bundle is None or sb.vm is None:
        return None
    try:
        await ops_call(sb.ops or sb.vm.dialer("ops"), lambda s: s.stage_release(
            ops_pb.StageReleaseRequest(version=bundle.version, sha256="", size=0)), 10.0,
            sb.session_key)
    except Unimplemented:
        return _cannot_stage(sb)
    except InvalidArgument:
        pass  # it knows StageRelease
    except KeelError as exc:
        return f"the agent does not answer on its ops channel: {exc}"
    return None


def _cannot_stage(sb: Sandbox) -> str:
    version = sb.agent.agent_version if sb.agent is not None else "?"
    return (f"its agent ({version}) predates StageRelease and cannot receive another release;"
            f" restart the pod to boot a newer image")


async def _guest_path(sb: Sandbox, stub: ops_pb.OpsServiceStub, agent_path: str) -> str:
    """What *sb*'s agent should exec for *agent_path*: itself outside a VM or for
    a guest path; else the host release's bundle, checked and staged (over *stub*)."""
    assert sb.agent is not None
    try:
        bundle = _bundle(sb, agent_path)
    except FailedPrecondition as exc:
        raise FailedPrecondition(f"sandbox {sb.id}: {exc}") from None
    if bundle is None:
        return agent_path
    from shim.vmm.qemu import guest_release  # a VM backend: already imported

    data = await asyncio.to_thread(guest_release.read_verified, bundle)
    began = asyncio.get_running_loop().time()
    offset = 0
    while True:
        chunk = data[offset:offset + STAGE_MAX_CHUNK]
        try:
            r: ops_pb.StageReleaseResponse = await sb.agent.call(
                stub.stage_release,
                ops_pb.StageReleaseRequest(version=bundle.version, sha256=bundle.sha256,
                                           size=bundle.size, offset=offset, data=chunk),
                timeout=STAGE_CALL_S, attempt_s=None, retry_for=0, resend=False)
        except Unimplemented:
            raise FailedPrecondition(f"sandbox {sb.id}: {_cannot_stage(sb)}") from None
        if r.path:
            break
        if r.received != offset + len(chunk) or not chunk:
            raise FailedPrecondition(f"the agent holds {r.received} bytes of release"
                                     f" {bundle.version} after a chunk ending at"
                                     f" {offset + len(chunk)}")
        offset = r.received
    log.info("staged release %s's agent (%d bytes) in the guest at %s in %.0f ms",
             bundle.version, bundle.size, guest_text(r.path, 200),
             (asyncio.get_running_loop().time() - began) * 1000)
    return r.path


async def upgrade_agent(sb: Sandbox, agent_path: str,
                        to_version: str) -> ops_pb.UpgradeAgentResponse:
    """Have *sb*'s agent exec *agent_path*; the ops answer, with the gap the
    shim saw and whether the new release was rolled back.

    Raises FailedPrecondition without a running agent, Unavailable when the
    agent does not come back within the shim's agent timeout.
    """
    if sb.vm is None or sb.agent is None:
        raise FailedPrecondition(f"sandbox {sb.id} has no running agent")
    # Spans under opsd's (when it traces): staging, the drain the agent does
    # before it answers, and the exec until the new image answers a Hello.
    tracer = sb.tracing.tracer
    with tracer.span("agent upgrade", {"keel.sandbox.id": sb.id, "keel.agent.to": to_version},
                     force=True) as top:
        # The sandbox's one ops connection (a virtio-serial port serves one client).
        channel = sb.ops or DialChannel(sb.vm.dialer("ops"), sb.session_key)
        try:
            stub = ops_pb.OpsServiceStub(channel)
            with tracer.span("stage release", force=True):
                agent_path = await _guest_path(sb, stub, agent_path)
            with tracer.span("drain and answer", force=True):
                resp: ops_pb.UpgradeAgentResponse = await sb.agent.call(
                    stub.upgrade_agent,
                    ops_pb.UpgradeAgentRequest(agent_path=agent_path, to_version=to_version),
                    timeout=UPGRADE_CALL_S, attempt_s=None, retry_for=0, resend=False)
        finally:
            channel.close()  # the agent execs: the next ops call dials the new image
        began = asyncio.get_running_loop().time()
        # A VM's agent ends the host's old serial session itself (GOAWAY); should
        # that be lost, a Hello unanswered for long is taken as a dead connection.
        with tracer.span("exec until ready", force=True):
            hello = await sb.agent.wait_ready(sb.config.agent_timeout_s, sb.vm.alive,
                                              attempt_s=UPGRADE_HELLO_ATTEMPT_S)
        if top is not None:
            top.set("keel.agent.from", resp.from_version)
            top.set("keel.agent.now", hello.agent_version)
    # The agent answered just before its exec; what runs now tells how it
    # ended.  The gap is as the shim saw it: that answer to the new Hello.
    resp.gap_s = asyncio.get_running_loop().time() - began
    resp.rolled_back = hello.agent_version != resp.to_version
    resp.message = (f"release {resp.to_version} failed; back on {hello.agent_version}"
                    if resp.rolled_back else "upgraded")
    log.info("agent upgraded %s -> %s (now %s, gap %.0f ms%s)", resp.from_version,
             resp.to_version, hello.agent_version, resp.gap_s * 1000,
             ", rolled back" if resp.rolled_back else "")
    sb.persist()
    return resp
