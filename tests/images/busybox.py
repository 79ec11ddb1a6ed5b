"""A busybox OCI image built from the host's busybox-static, with no registry.

`build_image(dest_dir)` writes an OCI image-layout tarball (`oci-layout`,
`index.json`, `blobs/sha256/...`) holding one uncompressed layer:
`/bin/busybox`, a symlink `/bin/<applet>` for every applet that
`busybox --list` prints, a minimal `/etc/passwd` and `/etc/group`, and the
usual empty mount-point directories.  The image config runs `sh` with a
standard PATH, or the command given as `cmd`: `build_pause_image` makes
the CRI suite's sandbox ("pause") image that way, the same layer with a
command that waits until it is signalled.

Builds are deterministic: every entry has mtime 0, uid/gid 0 and a fixed
mode, and entries are written in sorted order, so the same busybox binary
always gives the same layer, config, manifest and image digests.  The
tarball's file name carries a key over (builder version, busybox bytes,
ref, command), so a second call with the same inputs returns the existing
file.

`import_image(ctr_cmd_prefix, tar)` loads it with `ctr images import`.  The
index descriptor carries `io.containerd.image.name` (the full ref, which
containerd 1.6's importer uses verbatim) and
`org.opencontainers.image.ref.name` (the tag alone: `ctr import` without
`--base-name` drops full refs in that annotation, see
`archive.AddRefPrefix`), so the image comes out named `BUSYBOX_REF`.

Run as a script to build (and optionally import) by hand:
`python -m tests.images.busybox DEST_DIR`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUSYBOX_REF = "localhost/keel/busybox:test"
"""The name the image gets in containerd after `import_image`."""

PAUSE_REF = "localhost/keel/pause:test"
"""The CRI suite's sandbox image (`build_pause_image`)."""
#: What the pause image runs: wait for a signal; SIGTERM and SIGINT end it
#: with 0 (a shell as PID 1 would ignore them without a trap).
PAUSE_CMD = ("sh", "-c", 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done')

BUSYBOX_PATH = Path("/bin/busybox")
_DEFAULT_CMD = ("sh",)
# Bump when the layout or content changes, so cached tarballs are rebuilt.
_BUILDER_VERSION = "1"
_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DIRS = {  # path -> mode
    "bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o555,
    "root": 0o700, "run": 0o755, "sys": 0o555, "tmp": 0o1777, "usr": 0o755,
    "var": 0o755, "var/tmp": 0o1777,
}
_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"


def applets(busybox: Path = BUSYBOX_PATH) -> list[str]:
    """Applet names of `busybox`, sorted; raises CalledProcessError if it cannot run."""
    out = subprocess.run([str(busybox), "--list"], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    names = {n.strip() for n in out.splitlines()}
    # '[' and '[[' are fine as file names; 'busybox' itself is the real file.
    return sorted(n for n in names if n and "/" not in n and n != "busybox")


def build_image(dest_dir: Path | str, ref: str = BUSYBOX_REF,
                busybox: Path = BUSYBOX_PATH, cmd: Sequence[str] = _DEFAULT_CMD) -> Path:
    """Build (or reuse) the OCI image tarball in `dest_dir` and return its path.

    `cmd` is the image config's Cmd.  The result is content-addressed:
    `busybox-<key>.tar`, where the key hashes the builder version, the
    busybox binary, `ref` and (when not the default) `cmd`.  The file is
    written to a temporary name and renamed, so concurrent builders and
    interrupted builds never leave a partial tarball under the final name.
    Raises FileNotFoundError when `busybox` is missing.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    binary = busybox.read_bytes()
    parts = [_BUILDER_VERSION.encode(), hashlib.sha256(binary).digest(), ref.encode()]
    if tuple(cmd) != _DEFAULT_CMD:  # keeps the default image's key (and cached file) as it was
        parts.append(json.dumps(list(cmd)).encode())
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = dest / f"busybox-{key}.tar"
    if out.exists():
        return out
    layout = _layout(binary, applets(busybox), ref, list(cmd))
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".busybox-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_tar(layout))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def build_pause_image(dest_dir: Path | str, busybox: Path = BUSYBOX_PATH) -> Path:
    """`build_image` of the sandbox image: `PAUSE_REF`, running `PAUSE_CMD`."""
    return build_image(dest_dir, PAUSE_REF, busybox, PAUSE_CMD)


def image_ref(tar: Path | str) -> str:
    """The ref stored in the tarball's index.json (`io.containerd.image.name`)."""
    with tarfile.open(tar) as tf:
        member = tf.extractfile("index.json")
        if member is None:
            raise ValueError(f"{tar}: index.json is not a regular file")
        index = json.load(member)
    for desc in index.get("manifests", []):
        name = desc.get("annotations", {}).get("io.containerd.image.name")
        if name:
            return str(name)
    raise ValueError(f"{tar}: no io.containerd.image.name annotation in index.json")


def import_image(ctr_cmd_prefix: Sequence[str], tar: Path | str, timeout: float = 120) -> str:
    """Import `tar` with `<ctr_cmd_prefix> images import` and return the image ref.

    `ctr_cmd_prefix` is the ctr command up to the subcommand, e.g.
    `["ctr", "--address", sock, "--namespace", "keel-test"]`.  Raises
    RuntimeError (with ctr's output) if the import fails or the image is not
    listed afterwards.  Importing an image that is already present is fine.
    """
    ref = image_ref(tar)
    prefix = list(ctr_cmd_prefix)
    res = subprocess.run([*prefix, "images", "import", str(tar)], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ctr images import {tar} failed (rc={res.returncode}):\n"
                           f"{res.stdout}{res.stderr}")
    listed = subprocess.run([*prefix, "images", "ls", "-q"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    if ref not in listed.stdout.split():
        raise RuntimeError(f"imported {tar} but {ref} is not listed:\n{listed.stdout}"
                           f"{listed.stderr}\nimport said:\n{res.stdout}{res.stderr}")
    return ref


# --- building blocks --------------------------------------------------------

def _layout(binary: bytes, names: list[str], ref: str, cmd: list[str]) -> dict[str, bytes]:
    """The OCI layout's files, keyed by path inside the tarball."""
    layer = _tar(_rootfs(binary, names))
    arch = _ARCH.get(platform.machine(), platform.machine())
    config = _json({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": [_PATH_ENV], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": _descriptor(MT_CONFIG, config),
        "layers": [_descriptor(MT_LAYER, layer)],
    })
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    manifest_desc = _descriptor(MT_MANIFEST, manifest)
    manifest_desc["annotations"] = {
        "io.containerd.image.name": ref,
        "org.opencontainers.image.ref.name": tag,
    }
    manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
    index = _json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [manifest_desc]})
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for blob in (layer, config, manifest):
        files["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = blob
    return files


def _rootfs(binary: bytes, names: list[str]) -> dict[str, bytes | str | int]:
    """Layer entries: bytes = regular file, str = symlink target, int = directory mode."""
    entries: dict[str, bytes | str | int] = dict(_DIRS)
    entries["bin/busybox"] = binary
    entries["etc/passwd"] = _PASSWD.encode()
    entries["etc/group"] = _GROUP.encode()
    entries["etc/hostname"] = b"busybox\n"
    for name in names:
        entries.setdefault(f"bin/{name}", "busybox")
    return entries


def _tar(entries: dict[str, Any]) -> bytes:
    """A deterministic tar (GNU format, sorted, mtime 0, root-owned) of `entries`.

    Values: bytes = file (0755 for bin/*, else 0644), str = symlink target,
    int = directory with that mode.  Parent directories must be listed.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in sorted(entries):
            value = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(value, int):
                info.type, info.mode = tarfile.DIRTYPE, value
                tf.addfile(info)
            elif isinstance(value, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, value, 0o777
                tf.addfile(info)
            else:
                info.size = len(value)
                info.mode = 0o755 if name.startswith("bin/") else 0o644
                tf.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(blob), "size": len(blob)}


def main(argv: list[str]) -> int:
    """`busybox.py DEST_DIR [--import CTR_ARGS...]`: print the tarball path (and ref)."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    tar = build_image(argv[0])
    print(tar)
    if len(argv) > 1 and argv[1] == "--import":
        ctr = argv[2:] or [shutil.which("ctr") or "ctr"]
        print(import_image(ctr, tar))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
