"""upgrade.store: atomic writes, named migrations, corrupt and newer files."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from upgrade.errors import CorruptState, UnsupportedSchema
from upgrade.store import StateStore

GOLDEN = Path(__file__).parent / "golden"


def _store(path: Path, version: int = 2) -> StateStore[dict]:
    def v1_to_v2(doc: dict) -> dict:
        doc["items"] = [{"name": n} for n in doc.pop("names")]
        return doc

    return StateStore(path, kind="test", version=version, encode=dict, decode=dict,
                      migrations={1: v1_to_v2})


def test_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    st = _store(tmp_path / "s.json")
    st.save({"items": [{"name": "a"}]})
    assert st.load() == {"items": [{"name": "a"}]}
    assert os.stat(tmp_path / "s.json").st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.json.lock"]


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert _store(tmp_path / "nope.json").load() is None


def test_v1_migrates_forward(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"schema_version": 1, "kind": "test", "names": ["x", "y"]}))
    assert _store(path).load() == {"items": [{"name": "x"}, {"name": "y"}]}
    # Reading never rewrites: the file is still v1 until the owner saves.
    assert json.loads(path.read_text())["schema_version"] == 1


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"kind":"test"}',
                                     b'{"schema_version":"1","kind":"test"}', b"\xff\xfe"])
def test_corrupt_file_is_clear_error_and_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(CorruptState, match="s.json"):
        _store(path).load()
    assert path.read_bytes() == content


def test_newer_schema_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    raw = json.dumps({"schema_version": 9, "kind": "test"})
    path.write_text(raw)
    with pytest.raises(UnsupportedSchema, match="schema_version 9 is newer"):
        _store(path).load()
    assert path.read_text() == raw


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"schema_version": 2, "kind": "other"}))
    with pytest.raises(CorruptState, match="expected 'test'"):
        _store(path).load()


def test_shim_state_golden_v1_loads() -> None:
    """Every shim state schema that ever shipped must stay readable."""
    from keel.lifecycle import State
    from shim.dirs import SandboxDir
    from shim.state import ShimIdentity, store

    for golden in sorted(GOLDEN.glob("shim-state-v*.json")):
        st = store(SandboxDir(golden.parent))
        st.path = golden
        rec = st.load()
        assert rec is not None and rec.sandbox_id == "golden-pod"
        assert rec.containers[0].id == "c1"
        init = rec.containers[0].init
        assert (init.state, init.pid, init.offsets.stdout) == (State.RUNNING, 2, 12)
        assert rec.containers[0].mounts[0].options[0] == "index=off"
        assert rec.shim == ShimIdentity(pid=4241, start_time=100)
        assert rec.vmm == {"pid": 4242, "start_time": 99}


def _leaves(doc: object, path: str = "") -> dict[str, object]:
    if isinstance(doc, dict):
        return {k: v for key, val in doc.items() for k, v in _leaves(val, f"{path}/{key}").items()}
    if isinstance(doc, list):
        return {k: v for i, val in enumerate(doc) for k, v in _leaves(val, f"{path}/{i}").items()}
    return {path: doc}


def test_shim_state_written_is_readable_by_schema_1_readers() -> None:
    """What this release writes holds every field of the v1 golden file with
    the same value, so a release that reads only schema 1 (a rollback
    target) resumes the sandbox; new fields are only added."""
    from shim.state import SCHEMA_VERSION, decode, document

    golden = json.loads((GOLDEN / "shim-state-v1.json").read_text())
    assert SCHEMA_VERSION == 1
    written = _leaves(document(decode({k: v for k, v in golden.items()
                                       if k not in ("schema_version", "kind")})))
    missing = {k: v for k, v in _leaves(golden).items() if written.get(k, object()) != v}
    assert missing == {}


def test_shim_state_keeps_the_sandbox_start() -> None:
    """``created_at_ns`` (for the sandbox's uptime) survives a handoff's
    encode/decode; a file without it (an older release's) reads as 0."""
    from shim.state import decode, encode

    golden = json.loads((GOLDEN / "shim-state-v1.json").read_text())
    doc = {k: v for k, v in golden.items() if k not in ("schema_version", "kind")}
    assert decode(doc).created_at_ns == 0
    rec = dataclasses.replace(decode(doc), created_at_ns=1_700_000_000_123_456_789)
    assert decode(encode(rec)) == rec
    with pytest.raises(TypeError):
        decode({**doc, "created_at_ns": "yesterday"})


def test_shim_state_of_a_bad_shape_is_corrupt(tmp_path: Path) -> None:
    """A hand-edited state file with a wrong type is CorruptState, left in place."""
    from shim.dirs import SandboxDir
    from shim.state import store

    golden = json.loads((GOLDEN / "shim-state-v1.json").read_text())
    golden["containers"][0]["init"]["pid"] = {"not": "a pid"}
    sdir = SandboxDir(tmp_path)
    sdir.state.write_text(json.dumps(golden))
    with pytest.raises(CorruptState, match="TypeError"):
        store(sdir).load()
    assert json.loads(sdir.state.read_text()) == golden


@pytest.mark.requires_root
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """On a tiny tmpfs filled to the brim, save raises ENOSPC; the old state
    stands and no ``.tmp`` file is left behind."""
    import errno
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "keel-test-full", str(disk)],
                   check=True)
    try:
        st = _store(disk / "s.json")
        st.save({"items": [{"name": "old"}]})
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill what is left
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as err:
            st.save({"items": [{"name": "x" * 100_000}]})
        assert err.value.errno == errno.ENOSPC
        assert st.load() == {"items": [{"name": "old"}]}
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "s.json", "s.json.lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
