"""Task families, found by name through one table of lazy dotted paths.

``FAMILIES`` maps a family's name (the request's ``task``) to ``"module:ATTRIBUTE"``, the object
implementing ``common.families.base.Family``. Nothing is imported until a family is asked for, so
reading the table costs no torch import (``query.whoami`` stays cheap), the way PEFT registers its
tuners and Chroma names its components. A new family is one folder and one line here, or one
:func:`register_family` call from the package that brings it (the tests' toy family does that).

The coordinator keeps one registry per family under its registry root
(:func:`family_registry_dirs`): the report family at the root itself, every other family in
``<root>/<RegistrySpec.subdir>/``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.families.base import Family

#: family name -> "module:ATTRIBUTE" of its ``Family`` object (imported on first use)
FAMILIES: dict[str, str] = {
    "report-text": "common.families.report.family:FAMILY",
    "segmentation": "common.families.segmentation.family:FAMILY",
}
#: families a deployment adds without editing this file: ``RPE_FAMILIES="name=module:ATTRIBUTE,..."`` in
#: the environment of every process that must know them (the SuperNodes' ClientApps, the ServerApp,
#: ``rpe console``), the way a package brings a family with one ``register_family`` call
FAMILIES_ENV = "RPE_FAMILIES"


def _families_from(value: str) -> dict[str, str]:
    """``{name: "module:ATTRIBUTE"}`` from ``$RPE_FAMILIES``; a malformed entry is an error naming it."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        name, sep, dotted = item.partition("=")
        if not sep or not name.strip() or ":" not in dotted:
            raise ValueError(
                f"${FAMILIES_ENV}: {item!r} is not NAME=module:ATTRIBUTE (e.g. toy=mypkg.toy:FAMILY); "
                "separate several families with commas"
            )
        out[name.strip()] = dotted.strip()
    return out


FAMILIES.update(_families_from(os.environ.get(FAMILIES_ENV, "")))
#: the family a request without ``task`` means (the first family this system had)
DEFAULT_FAMILY = "report-text"
_LOADED: dict[str, Family] = {}


class UnknownFamilyError(KeyError):
    """No family of that name is registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def family_names() -> list[str]:
    """The registered family names, in table order."""
    return list(FAMILIES)


def register_family(name: str, dotted: str) -> None:
    """Add (or re-point) family ``name`` at ``"module:ATTRIBUTE"``; imported on first use."""
    if ":" not in dotted:
        raise ValueError(f"family {name!r}: {dotted!r} is not 'module:ATTRIBUTE'")
    FAMILIES[name] = dotted
    _LOADED.pop(name, None)


def get_family(name: str) -> Family:
    """The family called ``name`` (imported on first use)."""
    if name in _LOADED:
        return _LOADED[name]
    dotted = FAMILIES.get(name)
    if dotted is None:
        raise UnknownFamilyError(f"unknown task family {name!r}; known families: {', '.join(FAMILIES)}")
    module, _, attr = dotted.partition(":")
    family = getattr(importlib.import_module(module), attr)
    missing = [m for m in protocol_members() if not hasattr(family, m)]
    if missing:
        raise TypeError(f"family {name!r} ({dotted}) does not implement Family: it lacks {', '.join(missing)}")
    if family.name != name:
        raise ValueError(f"family table entry {name!r} -> {dotted} names itself {family.name!r}")
    _LOADED[name] = family
    return family


def protocol_members() -> list[str]:
    """The attributes and methods every family has (``common.families.base.Family``)."""
    from common.families.base import Family

    methods = [k for k, v in vars(Family).items() if callable(v) and not k.startswith("_")]
    return [*Family.__annotations__, *methods]


def family_registry_dir(root: str | Path, name: str) -> Path:
    """Where family ``name`` keeps its registry under the coordinator's registry ``root``."""
    sub = get_family(name).registry.subdir
    base = Path(root).expanduser()
    return base / sub if sub else base


def family_registry_dirs(root: str | Path) -> dict[str, Path]:
    """``{family: registry directory}`` of every registered family that has a registry under the
    coordinator's registry ``root`` (a ``registry.json`` in its directory), in table order."""
    out: dict[str, Path] = {}
    for name in FAMILIES:
        path = family_registry_dir(root, name)
        if (path / "registry.json").is_file():
            out[name] = path
    return out
