"""``rpe``: the command line of the RPE federation, assembled from each side's sub-commands.

This is the composition root: it builds the top-level parser and lets each side register its own
commands (``server.cli``: registry, blob-key, compose, audit, experiment; ``client.cli``: embed,
keygen, privacy). Adding a module of commands is one line in ``REGISTRARS``. Heavy modules are
imported inside each command, so ``rpe --help`` is instant; a site's commands never import the
coordinator's code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from common.cli_base import CliError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

#: modules with ``register(subparsers) -> None``, in the order their commands appear in ``rpe --help``
REGISTRARS = (
    "server.cli",
    "server.console.cli",
    "client.cli",
    "client.use",
    "client.datacheck",
    "deploy.onboard.cli",
    "client.export",
    "deploy.fed",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``rpe`` parser with every registered side's sub-commands."""
    p = argparse.ArgumentParser(
        prog="rpe",
        description="Retrieval-based parameter ensembles: store site LoRAs with their data embeddings, "
        "and compose the nearest ones for a new site without training.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in REGISTRARS:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rpe`` console script: a user error is one ``rpe: error:`` line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"rpe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, LookupError, OSError) as exc:  # typed library errors carry their own advice
        print(f"rpe: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        from server.registry import RegistryError  # lazy: a site's commands never import the coordinator's code

        if isinstance(exc, RegistryError):
            print(f"rpe: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
