"""``opsctl release``: install, list, remove and point ``current`` at releases.

Done by opsctl itself on the releases directory (no opsd needed, so the
first release, which carries opsd, installs the same way).  "In use"
means: reported by a sandbox's shim (or, for a sandbox that does not
answer, recorded in its state.json), or named by opsd's active upgrade
plan (asked when opsd is reachable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from pathlib import Path

from keel.errors import KeelError
from opsd._client import CliError, call
from opsd._pb.keel.opsd import v1 as pb
from opsd.api import default_state_root
from upgrade.releases import DEFAULT_ROOT, ReleaseStore


def in_use(args: argparse.Namespace) -> dict[str, set[str]]:
    """version -> who uses it (sandboxes, the active upgrade plan)."""
    # Here, not at the top: every opsctl command (a console's attach too)
    # would pay for importing the shim's side.
    from opsd._discovery import ShimClient, scan
    from shim.api import SandboxDir, load_record

    users: dict[str, set[str]] = defaultdict(set)
    views, dead = asyncio.run(scan(ShimClient(args.state_root, status_timeout=2.0)))
    for v in views:
        users[v.shim_version].add(f"sandbox {v.id}")
        users[v.agent_version].add(f"sandbox {v.id}")
    for d in dead:
        try:
            rec = load_record(SandboxDir.of(args.state_root, d.id))
            users[rec.shim_version].add(f"sandbox {d.id} (not answering)")
        except (OSError, KeelError):
            print(f"warning: sandbox {d.id} does not answer and its state is unreadable")
    try:
        st = asyncio.run(call(args.socket, lambda s: s.upgrade_status(pb.UpgradeStatusRequest())))
    except CliError as exc:
        print(f"note: active upgrade plans not checked ({exc})")
    else:
        if st.found and st.plan.state in ("running", "rolling-back"):
            for version in {st.plan.to_version, *(t.from_shim for t in st.plan.targets),
                            *(t.from_agent for t in st.plan.targets)}:
                users[version].add(f"upgrade {st.plan.id}")
    return users


def cmd_install(args: argparse.Namespace) -> int:
    store = ReleaseStore(args.releases)
    users = in_use(args) if args.force else {}
    release = store.install(Path(args.source), force=args.force, in_use=users,
                            no_deps=args.no_deps, build_isolation=not args.no_build_isolation,
                            python=args.python, progress=lambda line: print(line, flush=True))
    if args.guest_image is not None:
        store.build_guest_image(release.version, Path(args.guest_image) if args.guest_image else None,
                                progress=lambda line: print(line, flush=True))
    if args.current:
        store.set_current(release.version)
        print(f"current -> {release.version}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    releases = ReleaseStore(args.releases).list()
    if args.json:
        print(json.dumps([{"version": r.version, "path": str(r.path), "current": r.is_current}
                          for r in releases], indent=2))
        return 0
    if not releases:
        print(f"no releases under {args.releases}")
    for r in releases:
        schema = f"shim state <= {r.manifest.shim_state_schema}" if r.manifest else ""
        print(f"{'*' if r.is_current else ' '} {r.version:<14} {r.path}  {schema}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    ReleaseStore(args.releases).remove(args.version, in_use(args))
    print(f"removed release {args.version} (guest images stay: `python -m shim.vmm.qemu.image"
          f" prune` removes those no release names and no VM runs)")
    return 0


def cmd_current(args: argparse.Namespace) -> int:
    ReleaseStore(args.releases).set_current(args.version)
    print(f"current -> {args.version} (new sandboxes start it; running ones keep theirs)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rel = sub.add_parser("release", help="install, list and remove releases")
    rel.add_argument("--releases", type=Path, default=DEFAULT_ROOT,
                     help="releases root (%(default)s)")
    rel.add_argument("--state-root", type=Path, default=default_state_root(),
                     help="sandbox state root, to see which releases are in use")
    rsub = rel.add_subparsers(dest="release_command", required=True, metavar="ACTION")
    inst = rsub.add_parser("install", help="install a wheel, sdist or project directory")
    inst.add_argument("source", help="keel-*.whl, keel-*.tar.gz or a source directory")
    inst.add_argument("--current", action="store_true", help="then point current at it")
    inst.add_argument("--force", action="store_true", help="reinstall an installed version")
    inst.add_argument("--no-deps", action="store_true", help="skip dependencies (tests)")
    inst.add_argument("--no-build-isolation", action="store_true",
                      help="build with this Python's setuptools (offline)")
    inst.add_argument("--python", help="interpreter for the release's venv (this one's base)")
    inst.add_argument("--guest-image", nargs="?", const="", default=None, type=str,
                      metavar="DIR",
                      help="also build or reuse the release's guest image for VM sandboxes"
                           " (in DIR, default $KEEL_IMAGE_DIR or /var/cache/keel/image); the"
                           " release's shims boot it.  Needs root, apt lists and debootstrap")
    inst.set_defaults(func=cmd_install)
    ls = rsub.add_parser("list", help="installed releases (* = current)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    rm = rsub.add_parser("remove", help="delete a release nobody uses")
    rm.add_argument("version")
    rm.set_defaults(func=cmd_remove)
    cur = rsub.add_parser("current", help="point current (new sandboxes) at a release")
    cur.add_argument("version")
    cur.set_defaults(func=cmd_current)
