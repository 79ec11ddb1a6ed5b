"""Entry point of ``containerd-shim-keel-v2``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from shim import _flags

    try:
        flags = _flags.parse(sys.argv[1:] if argv is None else argv)
    except _flags.FlagError as exc:
        print(f"containerd-shim-keel-v2: {exc}\n\n{_flags.USAGE}", file=sys.stderr)
        return 2
    if flags.help:
        print(_flags.USAGE)
        return 0
    if flags.version:
        from shim import version

        print(f"containerd-shim-keel-v2 {version()}")
        return 0
    if flags.action == "start":
        from shim._start import start

        return start(flags)
    if flags.action == "delete":
        from shim._delete import delete

        return delete(flags)
    from shim._daemon import serve

    return serve(flags)


if __name__ == "__main__":
    sys.exit(main())
