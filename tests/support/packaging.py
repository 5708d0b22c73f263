"""Packaging helpers: the shipped top packages and what is on disk under them (every package, every
data file a package reads next to itself), and what a copy of the checkout leaves out
(``tests/unit/test_packaging.py``, ``tests/integration/test_packaging_wheel.py``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("common", "server", "client", "deploy")
#: top-level entries that are not part of the source a wheel is built from (large, generated, local)
NOT_SOURCE = {".git", ".venv", "models", "runs", "build", "dist", "data", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_SOURCE)}


def _packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` under the shipped roots, as a dotted package name."""
    return {
        ".".join(init.parent.relative_to(ROOT).parts)
        for root in SHIPPED
        for init in (ROOT / root).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def _data_files_on_disk() -> set[str]:
    """Files in folders without ``__init__.py`` inside a package (templates, static files, ...):
    the code reads them next to itself, so the wheel must carry them."""
    found = set()
    for pkg in _packages_on_disk():
        pkg_dir = ROOT.joinpath(*pkg.split("."))
        for path in pkg_dir.rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.parent != pkg_dir and not (path.parent / "__init__.py").exists():
                found.add(path.relative_to(ROOT).as_posix())
    return found
