"""Which task family an adapter directory belongs to, and the site commands' output rules.

A site holds adapters of every family it runs side by side (``<site-dir>/adapters/``), so a person
can hand ``rpe generate`` a segmentation adapter or ``rpe segment`` a report one. The family is
read from what the site wrote with the adapter, cheapest first, without loading any weights:

1. ``rpe-provenance.json``'s ``task`` (every delivered adapter: ``client/delivery.py``);
2. the directory name ``own-<task>`` (the site's own adapters);
3. ``adapter_config.json``'s ``base_model_name_or_path`` whose last part is a family's
   ``default_model`` (``smollm2-135m-instruct``, ``litemedsam``).

None when nothing says (an adapter made elsewhere): the command then goes on and the model load
names what does not fit. :func:`check_out` is the one rule for a command's ``--out``: an existing
file or non-empty directory is refused without ``--force`` (as ``rpe compose`` does), before any work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

from common.families.base import CommandError

PROVENANCE_FILE = "rpe-provenance.json"
OWN_PREFIX = "own-"


def adapter_family(adapter_dir: str | Path) -> str | None:
    """The family ``adapter_dir`` was trained or delivered for (see the module docstring), or None."""
    from common.families import family_names, get_family

    adir = Path(adapter_dir)
    known = family_names()
    try:
        task = json.loads((adir / PROVENANCE_FILE).read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError, RecursionError):  # a malformed file: nothing says
        task = None
    if isinstance(task, str) and task in known:
        return task
    if adir.name.startswith(OWN_PREFIX) and adir.name[len(OWN_PREFIX) :] in known:
        return adir.name[len(OWN_PREFIX) :]
    try:
        cfg = json.loads((adir / "adapter_config.json").read_text(encoding="utf-8")[: 1 << 20])
        base = cfg.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError, RecursionError):  # a malformed file: nothing says
        return None
    if not isinstance(base, str) or not base:
        return None
    last = Path(base).name
    for name in known:
        default = get_family(name).default_model
        if default and last == default:
            return name
    return None


def family_command_names(name: str) -> list[str]:
    """The ``rpe`` sub-commands family ``name`` brings (``Family.commands``), e.g. ``["segment"]``."""
    from common.families import get_family

    dotted = get_family(name).commands
    if not dotted:
        return []
    module, _, attr = dotted.partition(":")
    sub = argparse.ArgumentParser(add_help=False).add_subparsers()
    getattr(importlib.import_module(module), attr)(sub)
    return list(sub.choices)


def check_adapter_family(adapter_dir: str | Path, expected: str, command: str) -> None:
    """Refuse an adapter of another family than ``expected``, naming the command that fits it."""
    got = adapter_family(adapter_dir)
    if got is None or got == expected:
        return
    fits = family_command_names(got)
    hint = (
        f"use `rpe {fits[0]} --adapter {adapter_dir} ...` (the {got} family's command)"
        if fits
        else f"the {got} family has no site command"
    )
    raise CommandError(f"{adapter_dir} is a {got} adapter; `rpe {command}` takes a {expected} adapter: {hint}")


def check_out(out: str | os.PathLike[str], force: bool, what: str = "file") -> Path:
    """``out`` as a path this command may write: an existing file or non-empty directory is refused
    unless ``force`` (nothing is written, nothing is loaded before this check)."""
    path = Path(out)
    if what == "file":
        if path.is_dir():
            raise CommandError(f"--out {path} is a directory; name the file to write")
        if (path.exists() or path.is_symlink()) and not force:
            raise CommandError(f"--out {path} exists; refusing to overwrite it: choose another path, or pass --force")
        return path
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise CommandError(f"--out {path} exists and is not a directory; choose another path")
        if any(path.iterdir()) and not force:
            raise CommandError(
                f"--out {path} is a directory that is not empty; refusing to overwrite it: choose a new "
                "or empty directory, or pass --force (its contents are then replaced)"
            )
    return path
