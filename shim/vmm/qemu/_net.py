"""Pod networking for a VM: the CNI veth bridged to a tap with tc (Kata's tcfilter model).

CNI leaves the pod's network namespace with one veth holding the pod's
addresses and routes.  The VM cannot use the veth itself, so:

* a tap device is created in that namespace (its fd is handed to qemu as
  ``-netdev tap,fd=N``; qemu runs in the host namespace, only the fd lives
  in the pod's), with the veth's MTU;
* an ``ingress`` qdisc on each of veth and tap, with a match-all u32 filter
  whose ``mirred egress redirect`` action sends every frame to the other
  one: frames pass between the wire and the guest without the namespace's
  own IP stack (which keeps the addresses, so CNI DEL finds what it made);
* the guest NIC gets the veth's MAC, and the guest is told the veth's name,
  MTU, IPv4 and IPv6 addresses and routes (``guest_config``: lines the guest init
  applies with ``ip`` before the agent starts).

The tap is not persistent: it disappears with qemu's fd, and its filter
with it.  ``teardown`` removes the veth's ingress qdisc (and so its filter).
IPv6 is not carried yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

from keel.errors import FailedPrecondition, Internal, KeelError
from keel.netns import in_netns

log = logging.getLogger("keel.shim.qemu")

TAP_NAME = "tap0_keel"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_ETH_P_ALL = 0x0003
_INGRESS = 0xFFFF0000
_RTPROT_KERNEL = 2
_RTPROT_RA = 9  # learnt from a router advertisement: the guest learns its own
_RT_SCOPE_UNIVERSE = 0
_RT_SCOPE_LINK = 253
_RT_TABLE_MAIN = 254


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    dst: str  # "default" or "10.1.0.0/16"
    gateway: str = ""
    link_scope: bool = False
    ipv6: bool = False
    #: RTA_PRIORITY (IPv6 routes carry one: CNI's get 1024); 0 for none.
    metric: int = 0

    def line(self) -> str:
        words = ["route6" if self.ipv6 else "route", self.dst]
        if self.gateway:
            words += ["via", self.gateway]
        if self.link_scope:
            words += ["scope", "link"]
        if self.metric:
            words += ["metric", str(self.metric)]
        return " ".join(words)


@dataclasses.dataclass(frozen=True, slots=True)
class PodNic:
    """The pod's veth as CNI configured it, and the tap bridged to it."""

    netns: str
    veth: str
    mac: str
    mtu: int
    addresses: tuple[str, ...]
    routes: tuple[Route, ...]

    def guest_config(self) -> str:
        """What the guest init applies (``link MAC NAME MTU``, ``addr CIDR``, ``route ...``)."""
        lines = [f"link {self.mac} {self.veth} {self.mtu}"]
        lines += [f"{'addr6' if ':' in a else 'addr'} {a}" for a in self.addresses]
        lines += [r.line() for r in self.routes]
        return "".join(f"{line}\n" for line in lines)


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    return msg.get_attr(name, default)


def _find_veth(ipr: Any, netns: str) -> Any:
    links = [link for link in ipr.get_links() if _attr(link, "IFLA_IFNAME") not in ("lo", TAP_NAME)]
    ether = [link for link in links if _attr(link, "IFLA_ADDRESS")]
    if not ether:
        raise FailedPrecondition(f"network namespace {netns} has no interface to give the VM")
    veths = [link for link in ether
             if (info := _attr(link, "IFLA_LINKINFO")) is not None
             and info.get_attr("IFLA_INFO_KIND") == "veth"]
    return (veths or ether)[0]


def _addresses(ipr: Any, index: int) -> tuple[str, ...]:
    """Global IPv4 and IPv6 addresses (a link-local one the guest makes itself)."""
    return tuple(f"{_attr(a, 'IFA_ADDRESS')}/{a['prefixlen']}"
                 for family in (socket.AF_INET, socket.AF_INET6)
                 for a in ipr.get_addr(family=family, index=index)
                 if a["scope"] == _RT_SCOPE_UNIVERSE)


def _routes(ipr: Any, index: int) -> tuple[Route, ...]:
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family, table=_RT_TABLE_MAIN):
            if _attr(r, "RTA_OIF") != index or r["proto"] in (_RTPROT_KERNEL, _RTPROT_RA):
                continue
            dst = _attr(r, "RTA_DST")
            found.append(Route(dst=f"{dst}/{r['dst_len']}" if dst else "default",
                               gateway=_attr(r, "RTA_GATEWAY") or "",
                               link_scope=r["scope"] == _RT_SCOPE_LINK,
                               ipv6=family == socket.AF_INET6,
                               metric=_attr(r, "RTA_PRIORITY") or 0))
    # Link-scope routes first: a gateway must be reachable when its route is added.
    return tuple(sorted(found, key=lambda r: (bool(r.gateway), r.dst == "default")))


def _open_tap(name: str) -> int:
    """A new tap named *name* in this thread's network namespace; its fd (the
    device lives while the fd is open)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _iproute() -> Iterator[Any]:
    """An IPRoute on this thread's network namespace."""
    from pyroute2 import IPRoute  # heavy: imported only for sandboxes with a network

    # Its DEBUG log is every netlink message: never wanted in the shim's log.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    with IPRoute() as ipr:
        yield ipr


def _redirect(ipr: Any, src: int, dst: int) -> None:
    """Every frame arriving on *src* leaves through *dst* (ingress qdisc, u32, mirred)."""
    ipr.tc("add", "ingress", src, _INGRESS)
    ipr.tc("add-filter", "u32", src, parent=_INGRESS, prio=1, protocol=_ETH_P_ALL,
           target=0x10001, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": dst})


def attach(netns: str) -> tuple[PodNic, int]:
    """Bridge the pod's veth in *netns* to a new tap; (what the guest needs, the tap fd).

    Blocking (run it in a thread).  FailedPrecondition when the namespace
    has no interface; Internal when a netlink or tun call fails (nothing
    is left then).
    """
    try:
        nic, fd = in_netns(netns, lambda: _attach(netns))
    except OSError as exc:
        raise Internal(f"network namespace {netns}: {exc}") from exc
    except KeelError:
        raise
    except Exception as exc:
        raise Internal(f"network namespace {netns}: {exc!r}") from exc
    log.info("pod network %s: %s (%s, mtu %d, %s) <-> %s", netns, nic.veth, nic.mac, nic.mtu,
             ", ".join(nic.addresses) or "no address", TAP_NAME)
    return nic, fd


def _attach(netns: str) -> tuple[PodNic, int]:
    with _iproute() as ipr:
        link = _find_veth(ipr, netns)
        index = link["index"]
        nic = PodNic(
            netns=netns, veth=_attr(link, "IFLA_IFNAME"), mac=_attr(link, "IFLA_ADDRESS"),
            mtu=_attr(link, "IFLA_MTU") or 1500,
            addresses=_addresses(ipr, index), routes=_routes(ipr, index))
        fd = _open_tap(TAP_NAME)
        try:
            tap = ipr.link_lookup(ifname=TAP_NAME)[0]
            ipr.link("set", index=tap, mtu=nic.mtu, state="up")
            _redirect(ipr, index, tap)
            _redirect(ipr, tap, index)
        except BaseException:
            os.close(fd)  # the tap goes with it
            with contextlib.suppress(Exception):
                ipr.tc("del", "ingress", index, _INGRESS)
            raise
    return nic, fd


def teardown(netns: str, veth: str) -> None:
    """Remove the veth's redirect (the tap is gone with qemu); idempotent, best effort."""
    if not os.path.exists(netns):
        return

    def remove() -> None:
        with _iproute() as ipr:
            found = ipr.link_lookup(ifname=veth)
            if found:
                ipr.tc("del", "ingress", found[0], _INGRESS)

    try:
        in_netns(netns, remove)
    except Exception as exc:  # noqa: BLE001 - gone already, or the namespace is being deleted
        log.debug("pod network %s: removing the redirect on %s: %s", netns, veth, exc)
