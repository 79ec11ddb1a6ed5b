"""The pod network of the CRI suite: a network namespace of the suite's own,
a CNI bridge conflist, and go-cni's cache on the host.

containerd runs inside `NetNs` (entered with ``nsenter --net``, see
`tests.containerd.Containerd`), so the bridge CNI creates for the first
pod, every pod's veth and the host-local leases live in that namespace
and in the temp root; deleting the namespace removes the bridge.  No
iptables rule is written (``ipMasq`` off, no portmap plugin).  Nothing
reaches beyond the namespace: pods talk to each other and to the bridge.

One thing escapes the temp root: go-cni (containerd 1.6) caches results
under ``/var/lib/cni/results`` whatever the conf dir says.  `CniCache`
removes the entries of this suite's network name, and the directories if
the suite created them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.containerd import which

#: Debian's containernetworking-plugins installs here.
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
#: The pod subnet and its gateway (the bridge's address).  Private to the
#: suite's namespace, so it cannot clash with the host's networks.
POD_SUBNET = ipaddress.ip_network("10.88.0.0/16")
GATEWAY = ipaddress.ip_address("10.88.0.1")
BRIDGE = "keel0"
CNI_CACHE = Path("/var/lib/cni")
#: Where `ip netns` mounts named namespaces.
NETNS_DIR = Path("/run/netns")


def missing_prerequisites() -> list[str]:
    """Why the pod network cannot be built on this host; empty if it can."""
    reasons = []
    for tool in ("ip", "nsenter"):
        try:
            which(tool)
        except FileNotFoundError as exc:
            reasons.append(str(exc))
    for plugin in CNI_PLUGINS:
        if not os.access(CNI_BIN_DIR / plugin, os.X_OK):
            reasons.append(f"CNI plugin {CNI_BIN_DIR / plugin} missing "
                           "(apt-get install containernetworking-plugins)")
    return reasons


@dataclass(frozen=True, slots=True)
class NetNs:
    """A named network namespace (``ip netns``), its loopback up."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @classmethod
    def add(cls, name: str) -> NetNs:
        """Create it; raises RuntimeError (with ip's stderr) if ip fails."""
        ns = cls(name)
        _ip("netns", "add", name)
        try:
            _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def exists(self) -> bool:
        return self.path.exists()

    def delete(self) -> None:
        """Delete it (and with it the bridge and whatever veth is left); idempotent."""
        if self.exists():
            _ip("netns", "delete", self.name)

    def addresses(self, device: str) -> list[str]:
        """The IPv4 addresses (CIDR) of `device` inside the namespace."""
        out = _ip("-n", self.name, "-j", "-4", "addr", "show", "dev", device)
        return [f'{a["local"]}/{a["prefixlen"]}' for link in json.loads(out or "[]")
                for a in link.get("addr_info", [])]


def write_conflist(conf_dir: Path, ipam_dir: Path, network: str) -> Path:
    """The bridge + loopback conflist CRI loads (its only one), leases under `ipam_dir`."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    ipam_dir.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                      "ranges": [[{"subnet": str(POD_SUBNET), "gateway": str(GATEWAY)}]],
                      # Both route styles of CNI configs in the wild: a default
                      # route, and a route to the pod subnet itself (which the
                      # kernel's connected route already covers: issue 19).
                      "routes": [{"dst": "0.0.0.0/0"}, {"dst": str(POD_SUBNET)}]}},
            {"type": "loopback"},
        ],
    }
    path = conf_dir / "10-keel.conflist"
    path.write_text(json.dumps(conflist, indent=2) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class CniCache:
    """go-cni's result cache for one network name; see the module docstring."""

    network: str
    created: tuple[Path, ...]  # the cache directories that did not exist before

    @classmethod
    def before_start(cls, network: str) -> CniCache:
        """Note which cache directories exist now (call before containerd starts)."""
        dirs = (CNI_CACHE, CNI_CACHE / "results")
        return cls(network, tuple(d for d in dirs if not d.exists()))

    def entries(self) -> list[Path]:
        """Cached results of this network (``<network>-<container id>-<ifname>``)."""
        results = CNI_CACHE / "results"
        return sorted(results.glob(f"{self.network}-*")) if results.is_dir() else []

    def remove(self) -> None:
        """Remove this network's entries, then the directories the suite created, if empty."""
        for entry in self.entries():
            entry.unlink(missing_ok=True)
        for d in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: someone else uses it now
                d.rmdir()


def _ip(*args: str) -> str:
    res = subprocess.run([which("ip"), *args], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed (rc={res.returncode}): "
                           f"{res.stderr.strip()}")
    return res.stdout
