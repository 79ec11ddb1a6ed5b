"""A release's guest agent bundle, both ends: building, reading and checking it
on the host (shim/vmm/qemu/guest_release.py) and receiving, verifying and
unpacking it in the guest (agent/_stage.py).

Real objects throughout: the bundle is built from this interpreter's own
packages, and the Stager writes real trees under tmp_path.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from agent import _stage
from agent._stage import Stager
from keel import release
from keel.errors import FailedPrecondition, InvalidArgument
from shim.vmm.qemu import guest_release as gr
from shim.vmm.qemu import image

# -- shim.vmm.qemu.guest_release ---------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gr.GuestRelease]:
    rel = tmp_path_factory.mktemp("rel")
    return rel, gr.build(rel / "guest")


def test_build_writes_a_bundle_that_load_reads_back(built: tuple[Path, gr.GuestRelease]) -> None:
    rel, made = built
    got = gr.load(rel)
    assert got == made and got.tar == rel / "guest" / "agent.tar"
    data = got.tar.read_bytes()
    assert (got.size, got.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (got.version, got.python, got.min_image_format) == (release.version(), "3.11",
                                                               image.FORMAT)
    assert set(got.requires) == {"grpclib", "betterproto", "tenacity"}
    assert gr.read_verified(got) == data


def test_the_tar_holds_the_agent_its_marker_and_unchecked_pycs(
        built: tuple[Path, gr.GuestRelease]) -> None:
    data = gr.read_verified(built[1])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "agent/__init__.py" in members and "upgrade/__init__.py" in members
    for name, m in members.items():
        assert not name.startswith("/") and ".." not in Path(name).parts, name
        assert m.isfile() or m.isdir(), name
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", ""), name
    assert (pycs := [n for n in members if "/__pycache__/" in n and n.endswith(".pyc")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        marker = tar.extractfile("keel/RELEASE")
        assert marker is not None and marker.read().decode().strip() == release.version()
        pyc = tar.extractfile(pycs[0])
        assert pyc is not None
        # PEP 552 flags: bit 0 hash-based, bit 1 check_source (off: "unchecked-hash").
        assert int.from_bytes(pyc.read(16)[4:8], "little") == 0b01


def test_building_twice_gives_the_same_bytes(tmp_path: Path,
                                             built: tuple[Path, gr.GuestRelease]) -> None:
    again = gr.build(tmp_path / "guest")
    assert gr.read_verified(again) == gr.read_verified(built[1])
    assert again.sha256 == built[1].sha256


def test_the_built_bundle_stages_in_the_guest(tmp_path: Path,
                                              built: tuple[Path, gr.GuestRelease]) -> None:
    bundle, data = built[1], gr.read_verified(built[1])
    stager = Stager(tmp_path / "releases", tmp_path / "image")
    path = _stage_all(stager, bundle.version, data, bundle.sha256, _stage.MAX_CHUNK)[-1][1]
    assert Path(path, "agent", "__init__.py").is_file()
    assert Path(path, "keel", "RELEASE").read_text().strip() == bundle.version


def _manifest(tmp_path: Path, **changes: object) -> Path:
    doc = {"kind": gr.KIND, "schema": gr.SCHEMA, "release": "1.0", "size": 10,
           "sha256": "a" * 64, "python": "3.11", "requires": {}, "min_image_format": 1}
    doc.update(changes)
    (tmp_path / "guest").mkdir(exist_ok=True)
    (tmp_path / "guest" / "agent.json").write_text(json.dumps(doc))
    return tmp_path


def test_load_reads_a_manifest_or_says_to_reinstall(tmp_path: Path) -> None:
    got = gr.load(_manifest(tmp_path, requires={"grpclib": ">=0.4"}))
    assert (got.version, got.size, got.requires) == ("1.0", 10, {"grpclib": ">=0.4"})
    with pytest.raises(FailedPrecondition, match="release 9.9.9 has no guest agent .*"
                                                 r"reinstall it with `opsctl release install --force`"):
        gr.load(tmp_path / "9.9.9")


@pytest.mark.parametrize(("changes", "message"), [
    ({"kind": "something.else"}, "this shim reads keel.guest-agent schema 1"),
    ({"schema": 2}, "this shim reads keel.guest-agent schema 1"),
    ({"sha256": "not-a-digest"}, r"malformed guest agent manifest \(size or sha256\)"),
    ({"sha256": "A" * 64}, r"malformed guest agent manifest \(size or sha256\)"),
    ({"size": 0}, r"malformed guest agent manifest \(size or sha256\)"),
    ({"size": gr.MAX_BYTES + 1}, r"malformed guest agent manifest \(size or sha256\)"),
    ({"size": "many"}, "malformed guest agent manifest: ValueError"),
    ({"requires": ["grpclib"]}, "malformed guest agent manifest"),
])
def test_load_refuses_a_wrong_manifest(tmp_path: Path, changes: dict[str, object],
                                       message: str) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        gr.load(_manifest(tmp_path, **changes))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', '{"kind": "keel.guest-agent"}'])
def test_load_refuses_malformed_json(tmp_path: Path, text: str) -> None:
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest" / "agent.json").write_text(text)
    with pytest.raises(FailedPrecondition, match="guest agent manifest"):
        gr.load(tmp_path)


def test_read_verified_refuses_an_edited_or_missing_tar(tmp_path: Path,
                                                        built: tuple[Path, gr.GuestRelease]) -> None:
    shutil.copytree(built[0] / "guest", tmp_path / "guest")
    bundle = gr.load(tmp_path)
    data = bytearray(gr.read_verified(bundle))
    data[len(data) // 2] ^= 0xFF
    bundle.tar.write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="does not match its manifest"):
        gr.read_verified(bundle)
    bundle.tar.unlink()
    with pytest.raises(FailedPrecondition, match="cannot read"):
        gr.read_verified(bundle)


_BUNDLE = gr.GuestRelease(
    version="2.0.0", tar=Path("/nonexistent/agent.tar"), size=1, sha256="0" * 64,
    python="3.11", requires={"grpclib": "<0.5,>=0.4.7", "betterproto": "==2.0.0b7",
                             "tenacity": ">=8.2"}, min_image_format=1)
_IMAGE = {"id": "img-1", "format": 1, "packages": {"python3": "3.11.2-1+b1"},
          "inputs": {"base": {"python": {"grpclib": "0.4.9", "betterproto": "2.0.0b7",
                                         "tenacity": "9.2.1"}}}}


def test_problem_passes_a_matching_image(built: tuple[Path, gr.GuestRelease]) -> None:
    assert gr.problem(_BUNDLE, copy.deepcopy(_IMAGE), "img-1") is None
    assert gr.problem(built[1], copy.deepcopy(_IMAGE), "img-1") is None
    unpinned = dataclasses.replace(_BUNDLE, requires={"tenacity": ""})  # "" = any version
    assert gr.problem(unpinned, copy.deepcopy(_IMAGE), "img-1") is None


def _with(path: tuple[str, ...], value: object) -> dict[str, object]:
    """A copy of _IMAGE with the key at *path* set to *value* (None: removed)."""
    node: dict = (doc := copy.deepcopy(_IMAGE))
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1]) if value is None else node.update({path[-1]: value})
    return doc


@pytest.mark.parametrize(("manifest", "message"), [
    (_with(("format",), 0), r"needs guest image format 1 or newer; .* img-1 \(format 0\)"),
    ({}, r"needs guest image format 1 or newer; .*\(format None\)"),
    (_with(("format",), "1"), "needs guest image format 1"),
    (_with(("packages", "python3"), "3.12.1-1"), "built for Python 3.11; .* has Python 3.12"),
    (_with(("packages",), None), "has Python of unknown version"),
    (_with(("inputs", "base", "python", "tenacity"), None), "does not have tenacity"),
    (_with(("inputs", "base", "python", "grpclib"), "0.5.0"),
     r"needs grpclib<0\.5,>=0\.4\.7; .* has grpclib 0\.5\.0"),
    (_with(("inputs", "base", "python", "betterproto"), "2.0.0"), "has betterproto 2.0.0"),
    (_with(("inputs", "base", "python", "grpclib"), "not a version"), "cannot compare grpclib"),
])
def test_problem_names_the_mismatch(manifest: dict[str, object], message: str) -> None:
    got = gr.problem(_BUNDLE, manifest, "img-1")
    assert got is not None
    assert "release 2.0.0" in got and re.search(message, got), got


@pytest.mark.parametrize(("packages", "want"), [
    ({"python3": "3.11.2-1+b1"}, "3.11"), ({"python3": "1:3.11.2"}, "3.11"),
    ({"python3": "3.12.1-1"}, "3.12"), ({"python3": "garbage"}, None),
    ({"python3": 311}, None), ({}, None), ("python3", None),
])
def test_image_python(packages: object, want: str | None) -> None:
    assert gr.image_python({"packages": packages}) == want


# -- agent._stage ------------------------------------------------------------

_SHA0 = "0" * 64


def _tar(version: str = "1.2.3", extra: tuple[tarfile.TarInfo, ...] = (),
         files: dict[str, bytes] | None = None) -> tuple[bytes, str]:
    """A bundle of *version* (its bytes and sha256), *extra* members appended last."""
    if files is None:
        files = {"agent/__init__.py": b"# agent\n", "keel/RELEASE": f"{version}\n".encode()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in files.items():
            tar.addfile(_member(name, size=len(body)), io.BytesIO(body))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
            size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size if kind == tarfile.REGTYPE else 0
    return info


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "releases"


def _stage_all(stager: Stager, version: str, data: bytes, sha: str, chunk: int) -> list:
    return [asyncio.run(stager.stage(version, sha, len(data), off, data[off:off + chunk]))
            for off in range(0, len(data), chunk)]


def test_a_bundle_in_one_chunk_is_unpacked(root: Path, tmp_path: Path) -> None:
    data, sha = _tar()
    got = asyncio.run(Stager(root, tmp_path / "image").stage("1.2.3", sha, len(data), 0, data))
    assert got == (len(data), str(root / f"1.2.3-{sha[:16]}"))
    tree = Path(got[1])
    assert (tree / "agent" / "__init__.py").read_bytes() == b"# agent\n"
    assert (tree / "keel" / "RELEASE").read_text() == "1.2.3\n" and (tree / ".complete").is_file()
    assert sorted(p.name for p in root.iterdir()) == [tree.name]


def test_a_bundle_in_chunks_and_again(root: Path, tmp_path: Path) -> None:
    data, sha = _tar()
    stager = Stager(root, tmp_path / "image")
    got = _stage_all(stager, "1.2.3", data, sha, 1000)
    assert len(got) > 2
    assert got[:-1] == [(min(n * 1000, len(data)), "") for n in range(1, len(got))]
    final = str(root / f"1.2.3-{sha[:16]}")
    assert got[-1] == (len(data), final)
    # Already there: answered at once, whatever the chunk.
    assert asyncio.run(stager.stage("1.2.3", sha, len(data), 0, b"")) == (len(data), final)
    assert asyncio.run(Stager(root, tmp_path / "image").stage("1.2.3", sha, len(data), 0,
                                                              data[:10])) == (len(data), final)


def test_a_chunk_out_of_place_is_refused(root: Path, tmp_path: Path) -> None:
    data, sha = _tar()
    stager = Stager(root, tmp_path / "image")
    assert asyncio.run(stager.stage("1.2.3", sha, len(data), 0, data[:100])) == (100, "")
    with pytest.raises(FailedPrecondition, match="chunk at 50 .*expected offset 100"):
        asyncio.run(stager.stage("1.2.3", sha, len(data), 50, data[50:150]))
    other, other_sha = _tar("4.5.6")
    with pytest.raises(FailedPrecondition, match=r"expected offset 0 \(no such bundle in flight"):
        asyncio.run(stager.stage("4.5.6", other_sha, len(other), 100, other[100:200]))
    # The bundle in flight is still taken where it ended.
    assert asyncio.run(stager.stage("1.2.3", sha, len(data), 100, data[100:]))[1]


def test_a_chunk_past_the_size_drops_the_partial(root: Path, tmp_path: Path) -> None:
    data, sha = _tar()
    stager = Stager(root, tmp_path / "image")
    asyncio.run(stager.stage("1.2.3", sha, len(data), 0, data[:100]))
    assert (root / ".partial").stat().st_size == 100
    with pytest.raises(InvalidArgument, match="past the bundle's"):
        asyncio.run(stager.stage("1.2.3", sha, len(data), 100, data[100:] + b"extra"))
    assert list(root.iterdir()) == []
    with pytest.raises(FailedPrecondition, match="no such bundle in flight"):
        asyncio.run(stager.stage("1.2.3", sha, len(data), 100, data[100:]))


def test_a_bundle_that_does_not_hash_to_its_sha_is_refused(root: Path, tmp_path: Path) -> None:
    data, _ = _tar()
    with pytest.raises(FailedPrecondition, match="does not match its sha256"):
        _stage_all(Stager(root, tmp_path / "image"), "1.2.3", data, "ab" * 32, 4096)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(("extra", "message"), [
    (_member("../evil"), "outside its tree"),
    (_member("../../evil"), "outside its tree"),
    (_member("/etc/evil"), "outside its tree"),
    (_member("agent/evil", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
    (_member("agent/evil", tarfile.LNKTYPE, "agent/__init__.py"), "not a regular file"),
    (_member("agent/evil", tarfile.CHRTYPE), "not a regular file"),
    (_member("agent/evil", tarfile.FIFOTYPE), "not a regular file"),
    (_member("agent/__init__.py"), "cannot unpack"),  # the same name twice
])
def test_a_hostile_tar_is_refused_and_leaves_nothing(root: Path, tmp_path: Path,
                                                     extra: tarfile.TarInfo, message: str) -> None:
    data, sha = _tar(extra=(extra,))
    with pytest.raises(FailedPrecondition, match=message):
        asyncio.run(Stager(root, tmp_path / "image").stage("1.2.3", sha, len(data), 0, data))
    assert list(root.iterdir()) == []
    assert sorted(p.name for p in root.parent.iterdir()) == ["releases"]
    assert not Path("/etc/evil").exists()


def _sparse(name: str, declared: int) -> bytes:
    """A PAX tar holding *name* as a 5-byte sparse file declared as *declared* bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, body in (("agent/__init__.py", b""), ("keel/RELEASE", b"1.2.3\n")):
            tar.addfile(_member(member, size=len(body)), io.BytesIO(body))
        info = _member(name, size=5)
        info.pax_headers = {"GNU.sparse.size": str(declared), "GNU.sparse.map": "0,5"}
        tar.addfile(info, io.BytesIO(b"hello"))
    return buf.getvalue()


@pytest.mark.parametrize(("declared", "message"), [
    (1000, "as a sparse file"),
    (200 << 20, "unpacks to more than"),  # the cap is checked before anything is written
])
def test_a_sparse_member_is_refused(root: Path, tmp_path: Path, declared: int,
                                    message: str) -> None:
    """A few bytes that unpack to 200 MiB of the guest's tmpfs (its RAM): refused."""
    data = _sparse("agent/big", declared)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(FailedPrecondition, match=message):
        asyncio.run(Stager(root, tmp_path / "image").stage("1.2.3", sha, len(data), 0, data))
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(("files", "message"), [
    ({"agent/__init__.py": b"", "keel/RELEASE": b"9.9.9\n"}, "it names '9.9.9'"),
    ({"keel/RELEASE": b"1.2.3\n"}, "not release 1.2.3's agent"),
    ({"agent/__init__.py": b""}, "it names None"),
])
def test_a_bundle_of_another_release_is_refused(root: Path, tmp_path: Path,
                                                files: dict[str, bytes], message: str) -> None:
    data, sha = _tar(files=files)
    with pytest.raises(FailedPrecondition, match=message):
        asyncio.run(Stager(root, tmp_path / "image").stage("1.2.3", sha, len(data), 0, data))
    assert list(root.iterdir()) == []


def test_bytes_that_are_not_a_tar_are_refused(root: Path, tmp_path: Path) -> None:
    data = b"not a tar at all" * 100
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(FailedPrecondition, match="is not a tar"):
        asyncio.run(Stager(root, tmp_path / "image").stage("1.2.3", sha, len(data), 0, data))
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(("version", "sha", "size", "data", "message"), [
    ("1.2.3", _SHA0, 0, b"", "a bundle of 0 bytes"),
    ("1.2.3", _SHA0, _stage.MAX_BYTES + 1, b"x", "the limit is"),
    ("1.2.3", _SHA0, _stage.MAX_BYTES, b"x" * (_stage.MAX_CHUNK + 1), "a chunk of"),
    ("../x", _SHA0, 10, b"x", "is not a release version"),
    ("", _SHA0, 10, b"x", "is not a release version"),
    (".hidden", _SHA0, 10, b"x", "is not a release version"),
    ("1" * 100, _SHA0, 10, b"x", "is not a release version"),
    ("1.2.3", "A" * 64, 10, b"x", "64 lower-case hex digits"),
    ("1.2.3", "0" * 63, 10, b"x", "64 lower-case hex digits"),
    ("1.2.3\n", _SHA0, 10, b"x", "is not a release version"),
    ("1.2.3", _SHA0 + "\n", 10, b"x", "64 lower-case"),
])
def test_out_of_limits_arguments_are_refused(root: Path, tmp_path: Path, version: str, sha: str,
                                             size: int, data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        asyncio.run(Stager(root, tmp_path / "image").stage(version, sha, size, 0, data))
    assert not root.exists() or list(root.iterdir()) == []


def test_staging_prunes_other_trees_but_the_running_one(root: Path, tmp_path: Path) -> None:
    a, a_sha = _tar("1.0")
    b, b_sha = _tar("2.0")
    c, c_sha = _tar("3.0")
    a_tree, b_tree = root / f"1.0-{a_sha[:16]}", root / f"2.0-{b_sha[:16]}"
    stager = Stager(root, tmp_path / "image")
    _stage_all(stager, "1.0", a, a_sha, 1 << 20)
    _stage_all(stager, "2.0", b, b_sha, 1 << 20)
    assert [p.name for p in root.iterdir()] == [b_tree.name]
    # An agent running from B keeps B when C arrives.
    _stage_all(Stager(root, b_tree), "1.0", a, a_sha, 1 << 20)
    _stage_all(Stager(root, b_tree), "3.0", c, c_sha, 1 << 20)
    assert sorted(p.name for p in root.iterdir()) == sorted([b_tree.name, f"3.0-{c_sha[:16]}"])
    assert not a_tree.exists() and (b_tree / ".complete").is_file()
