"""The agent's side of a VM pod's ``net.*`` sysctls (agent/_sysctls.py): what it
accepts from the shim's annotation and where it writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import _sysctls
from agent.api import NET_SYSCTLS_ANNOTATION
from keel.errors import FailedPrecondition, InvalidArgument


def _spec(sysctls: object, *namespaces: str) -> dict[str, Any]:
    return {"process": {"args": ["true"]},
            "annotations": {"other": "kept", NET_SYSCTLS_ANNOTATION: (
                sysctls if isinstance(sysctls, str) else json.dumps(sysctls))},
            "linux": {"namespaces": [{"type": t} for t in namespaces]}}


def test_takes_the_annotation_out_of_the_spec() -> None:
    spec = _spec({"net.ipv4.ip_unprivileged_port_start": "1000"}, "ipc", "mount")
    assert _sysctls.take_net_sysctls(spec) == {"net.ipv4.ip_unprivileged_port_start": "1000"}
    assert spec["annotations"] == {"other": "kept"}  # runc never sees it
    assert _sysctls.take_net_sysctls(spec) == {}
    assert _sysctls.take_net_sysctls({"process": {"args": ["true"]}}) == {}


@pytest.mark.parametrize(("sysctls", "error"), [
    ("not json", "must be a JSON object of strings"),
    (["net.ipv4.ip_forward"], "must be a JSON object of strings"),
    ({"net.ipv4.ip_forward": 1}, "must be a JSON object of strings"),
    ({"kernel.shm_rmid_forced": "1"}, "'kernel.shm_rmid_forced' is not a net.* sysctl"),
    ({"net.ipv4/../../kernel.x": "1"}, "is not a net.* sysctl"),
    ({"net..ipv4": "1"}, "is not a net.* sysctl"),
])
def test_refuses_what_is_not_a_net_sysctl(sysctls: object, error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        _sysctls.take_net_sysctls(_spec(sysctls))


def test_refuses_it_for_a_container_with_its_own_network_namespace() -> None:
    with pytest.raises(InvalidArgument, match="network namespace of its own"):
        _sysctls.take_net_sysctls(_spec({"net.ipv4.ip_forward": "1"}, "network"))


def test_writes_each_as_runc_does_and_names_the_one_that_fails(tmp_path: Path) -> None:
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_unprivileged_port_start").write_text("1024\n")
    _sysctls.apply({"net.ipv4.ip_unprivileged_port_start": "1000"}, tmp_path)
    assert (tmp_path / "net" / "ipv4" / "ip_unprivileged_port_start").read_text() == "1000"
    with pytest.raises(FailedPrecondition, match=r"sysctl net.ipv9.x='1': No such file"):
        _sysctls.apply({"net.ipv9.x": "1"}, tmp_path)
