"""The shim's command line, config and stdio parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.errors import InvalidArgument, Unimplemented
from shim import _flags, _stdio, config
from shim._bundle import sandbox_id, socket_path


def test_flags_as_containerd_passes_them() -> None:
    f = _flags.parse(["-namespace", "default", "-address", "/run/c.sock", "-publish-binary",
                      "/usr/bin/containerd", "-id", "t1", "-debug", "start"])
    assert (f.namespace, f.address, f.id, f.debug, f.action) == ("default", "/run/c.sock", "t1", True, "start")
    assert _flags.parse(["-id=x", "-bundle", "/b", "delete"]).bundle == "/b"
    assert _flags.parse(["-id", "x"]).action == ""


@pytest.mark.parametrize("argv,msg", [(["-bogus", "start"], "not defined"), (["-id"], "needs an argument"),
                                      (["-id", "x", "stop"], "unknown action"),
                                      (["start", "extra"], "unexpected")])
def test_bad_flags(argv: list[str], msg: str) -> None:
    with pytest.raises(_flags.FlagError, match=msg):
        _flags.parse(argv)


def test_group_by_sandbox_annotation(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}')
    assert sandbox_id(tmp_path, "c1") == "pod1"
    (tmp_path / "config.json").write_text('{"annotations":{}}')
    assert sandbox_id(tmp_path, "c1") == "c1"
    (tmp_path / "config.json").write_text('{"annotations":{"io.kubernetes.cri.sandbox-id":"../x"}}')
    with pytest.raises(InvalidArgument):
        sandbox_id(tmp_path, "c1")
    assert len(str(socket_path(Path("/run/keel"), "/run/containerd/containerd.sock", "k8s.io", "p"))) < 108


def test_stdio_uris() -> None:
    assert _stdio.parse("") == ("none", "")
    assert _stdio.parse("/run/fifo/x") == ("fifo", "/run/fifo/x")
    assert _stdio.parse("file:///var/log/x") == ("file", "/var/log/x")
    with pytest.raises(Unimplemented):
        _stdio.parse("binary:///usr/bin/logger")
    with pytest.raises(InvalidArgument):
        _stdio.parse("tcp://1.2.3.4")


def test_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEEL_STATE_ROOT", raising=False)
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
    f = tmp_path / "c.toml"
    f.write_text('[shim]\nbackend = "process"\nruntime = "crun"\n')
    assert config.load(f).runtime == "crun"
    f.write_text('[shim]\nbogus = 1\n')
    with pytest.raises(InvalidArgument, match="unknown key"):
        config.load(f)
    f.write_text('[shim]\nbackend = "xen"\n')
    with pytest.raises(InvalidArgument, match="backend"):
        config.load(f)
    with pytest.raises(InvalidArgument, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    # [tracing] sits beside [shim]; a bad one fails the shim's start, naming the file.
    f.write_text('[shim]\nruntime = "runc"\n[tracing]\nenabled = true\nratio = 0.5\n')
    assert (config.load(f).tracing.enabled, config.load(f).tracing.ratio) == (True, 0.5)
    assert config.load(f).tracing.start_ratio == 0.5
    f.write_text('[tracing]\nratio = 1.5\n')
    with pytest.raises(InvalidArgument, match="ratio must be within 0 and 1"):
        config.load(f)
    f.write_text('[tracing]\nenpoint = "http://x:4318"\n')
    with pytest.raises(InvalidArgument, match=f"config file {f}: unknown key 'enpoint' in"):
        config.load(f)
    monkeypatch.setenv("KEEL_STATE_ROOT", str(tmp_path))
    assert config.load(tmp_path / "missing.toml" if False else None).state_root == tmp_path


@pytest.mark.parametrize("status", [0, 1, 137, 300])
@pytest.mark.parametrize("ns", [0, 1_796_112_969_000_000_000, 1_796_112_969_123_456_789])
def test_hand_encoded_delete_response_parses(status: int, ns: int) -> None:
    from shim._delete import delete_response
    from shim._pb.containerd.task import v2 as task_pb

    resp = task_pb.DeleteResponse().parse(delete_response(status, ns))
    assert (resp.pid, resp.exit_status) == (0, status)
    stamp = resp.exited_at
    assert int(stamp.timestamp()) == ns // 1_000_000_000
    assert stamp.microsecond == ns % 1_000_000_000 // 1000


def test_start_refuses_a_state_root_too_long_for_its_sockets(tmp_path: Path) -> None:
    """A state root longer than any socket layout allows: `start` says which
    root and how long it may be, instead of a daemon dying at bind time."""
    import json
    import os
    import subprocess
    import sys

    from shim.dirs import MAX_STATE_ROOT

    pod = "a" * 64
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(
        {"annotations": {"io.kubernetes.cri.sandbox-id": pod}}))
    long_root = tmp_path / ("r" * max(1, MAX_STATE_ROOT + 1 - len(str(tmp_path)) - 1))
    assert len(str(long_root)) > MAX_STATE_ROOT
    res = subprocess.run(
        [sys.executable, "-m", "shim", "-namespace", "k8s.io", "-address", "/run/c.sock",
         "-id", pod, "start"], cwd=bundle, capture_output=True, text=True, timeout=60,
        env={**os.environ, "KEEL_STATE_ROOT": str(long_root)}, stdin=subprocess.DEVNULL)
    assert res.returncode == 1
    assert res.stdout.startswith(f"keel shim start failed: state root {long_root} is too long"), \
        res.stdout
    assert f"use a state_root of at most {MAX_STATE_ROOT} bytes" in res.stdout
    assert not long_root.exists()  # nothing made before the refusal


def test_sockets_move_to_a_short_directory_under_a_long_state_root(tmp_path: Path) -> None:
    """CRI's 64-character pod ids: under /run/keel (and any root earlier
    releases could use) the sockets stay in the sandbox directory; under a
    longer root they live in <root>/c/<hash>/, which create() makes 0700 and
    remove() removes with the sandbox directory."""
    from shim.dirs import MAX_STATE_ROOT, SUN_PATH_MAX, SandboxDir

    pod = "b" * 64
    short = SandboxDir.of(Path("/run/keel"), pod)
    assert short.sockets_dir == short.root and short.channel("agent").parent == short.root
    short.check_fits()
    root = tmp_path / ("r" * (MAX_STATE_ROOT - len(str(tmp_path)) - 1))
    assert len(str(root)) == MAX_STATE_ROOT
    sdir = SandboxDir.of(root, pod)
    sdir.check_fits()
    assert sdir.sockets_dir.parent == root / "c" and sdir.sockets_dir != sdir.root
    paths = [sdir.ops_socket, sdir.ops_socket_tmp(4194304), sdir.qmp,
             sdir.channel("agent"), sdir.channel("ops")]
    assert all(p.parent == sdir.sockets_dir for p in paths)
    assert max(len(str(p).encode()) for p in paths) <= SUN_PATH_MAX
    assert SandboxDir.of(root, "c" * 64).sockets_dir not in (sdir.sockets_dir, sdir.root)
    sdir.create()
    assert sdir.sockets_dir.stat().st_mode & 0o777 == 0o700
    import socket
    with socket.socket(socket.AF_UNIX) as s:  # a socket really binds there
        s.bind(str(sdir.channel("agent")))
    sdir.remove()
    assert not sdir.root.exists() and not sdir.sockets_dir.exists()


def test_delete_cleans_up_under_the_pods_own_config(tmp_path: Path) -> None:
    """containerd gives ``delete`` no runtime options: it finds the config that
    ``start`` was given (CRI's ConfigPath) in the bundle, and cleans up under
    that config's state root, not the default one."""
    import os
    import subprocess
    import sys

    from shim._bundle import note_config
    from shim.dirs import SandboxDir
    from shim.state import SandboxRecord, ShimIdentity, store

    root = tmp_path / "podroot"
    cfg = tmp_path / "pod.toml"
    cfg.write_text(f'[shim]\nbackend = "process"\nstate_root = "{root}"\n')
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"annotations": {}}')
    note_config(bundle, str(cfg))
    sdir = SandboxDir.of(root, "c1")
    sdir.create()
    store(sdir).save(SandboxRecord(
        sandbox_id="c1", namespace="k8s.io", backend="process", vmm={"pid": 2**22, "start_time": 1},
        # pid 2**22 is above pid_max: a shim and an agent that cannot be running
        shim=ShimIdentity(2**22, 1), shim_version="0.1.0"))
    env = {k: v for k, v in os.environ.items() if k not in ("KEEL_CONFIG", "KEEL_STATE_ROOT")}
    res = subprocess.run(
        [sys.executable, "-m", "shim", "-namespace", "k8s.io", "-address", "/run/c.sock",
         "-id", "c1", "-bundle", str(bundle), "delete"], cwd=bundle, capture_output=True,
        timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert not sdir.root.exists(), (res.stderr, list(sdir.root.iterdir()))
