"""upgrade.store: atomic writes, named migrations, corrupt and newer files."""

from __future__ import annotations

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
    from shim.dirs import SandboxDir
    from shim.state import KIND, SCHEMA_VERSION, store  # noqa: F401

    for golden in sorted(GOLDEN.glob("shim-state-v*.json")):
        st = store(SandboxDir(golden.parent))
        st.path = golden
        rec = st.load()
        assert rec is not None and rec.sandbox_id == "golden-pod"
        assert rec.containers[0]["id"] == "c1"
