"""``python -m server.console --registry DIR ...``: the same as ``rpe console`` (used by the browser tests)."""

from __future__ import annotations

import argparse
import sys

from server.console.cli import ConsoleConfigError, register


def main(argv: list[str] | None = None) -> None:
    """Parse ``rpe console``'s flags and serve."""
    parser = argparse.ArgumentParser(prog="python -m server.console")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["console", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except (ConsoleConfigError, OSError) as exc:
        print(f"rpe console: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
