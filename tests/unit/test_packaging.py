"""The project installs the ordinary way: ``pip install .`` gives a working coordinator, site and console.

Why: the checkout runs from an editable install, which finds every folder on disk whatever
pyproject.toml says; the wheel ships only what the packaging config names. It once named the four
top packages only, so a coordinator installed from the wheel had no server/registry, server/modes,
server/console (nor its templates) or server/zindex and ``server.app`` could not be imported, and
no test noticed. Here the wheel is built from a copy of the checkout, installed into a fresh virtual
environment outside it, and every module it contains is imported from there.

The fast checks (no build) hold pyproject.toml to the folders on disk and the pre-commit hooks to
the checks CI runs (scripts/test.sh).
"""

from __future__ import annotations

import re
from pathlib import Path

import setuptools
import tomllib
from support.packaging import SHIPPED, _data_files_on_disk, _packages_on_disk

ROOT = Path(__file__).resolve().parents[2]


# -- fast: the configuration against the tree -----------------------------------------------------------


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})


def test_package_discovery_finds_every_package_and_no_tests() -> None:
    packages = _setuptools_config().get("packages")
    assert isinstance(packages, dict) and "find" in packages, (
        f"pyproject.toml [tool.setuptools] packages = {packages!r}: a fixed list misses every sub-package it "
        "does not name; use [tool.setuptools.packages.find]"
    )
    find = packages["find"]
    found = set(setuptools.find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    missing = _packages_on_disk() - found
    assert not missing, f"pyproject.toml [tool.setuptools.packages.find] leaves out {sorted(missing)}"
    stray = {p for p in found if p.split(".")[0] not in SHIPPED}
    assert not stray, f"the wheel would ship {sorted(stray)}; only {SHIPPED} are the product"


def test_package_data_covers_every_data_folder() -> None:
    """A template or static file added to a package folder is named by a package-data pattern."""
    package_data = _setuptools_config().get("package-data", {})
    uncovered = []
    for rel in sorted(_data_files_on_disk()):
        path = Path(rel)
        owners = [".".join(path.parts[:i]) for i in range(len(path.parts) - 1, 0, -1)]
        pkg = next(o for o in owners if o in _packages_on_disk())
        inside = path.relative_to(*pkg.split(".")).as_posix()
        if not any(_glob_match(inside, pat) for pat in package_data.get(pkg, [])):
            uncovered.append(f"{rel} (package {pkg})")
    assert not uncovered, f"not in [tool.setuptools.package-data], so not in the wheel: {uncovered}"


def _glob_match(rel: str, pattern: str) -> bool:
    """setuptools' package-data glob: ``**`` spans folders, ``*`` stays inside one."""
    rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return re.fullmatch(rx, rel) is not None


def test_pre_commit_runs_the_checks_ci_runs() -> None:
    """Each lint / layer / type check in scripts/test.sh is a pre-commit hook with the same command,
    so a commit that passes the hooks passes those CI steps."""
    from pre_commit.clientlib import load_config  # validates the file against pre-commit's schema

    config = load_config(str(ROOT / ".pre-commit-config.yaml"))
    hooks = [h for repo in config["repos"] for h in repo["hooks"]]
    assert all(repo["repo"] == "local" for repo in config["repos"]), "hooks must not need a download"
    entries = [h["entry"] for h in hooks]
    checks = [
        line[line.index(".venv/bin/") :].strip()
        for line in (ROOT / "scripts" / "test.sh").read_text().splitlines()
        if not line.lstrip().startswith("#") and re.search(r"\.venv/bin/(ruff|lint-imports|mypy)\b", line)
    ]
    assert len(checks) >= 3, f"scripts/test.sh lost its lint steps: {checks}"
    missing = [c for c in checks if not any(e == c or e.endswith(" " + c) for e in entries)]
    assert not missing, f"CI runs {missing} but no hook in .pre-commit-config.yaml does (hooks: {entries})"


def test_commit_subject_hook_allows_72_characters_not_73() -> None:
    """The commit-msg hook keeps subjects to 72 characters (the body carries the detail)."""
    from pre_commit.clientlib import load_config

    config = load_config(str(ROOT / ".pre-commit-config.yaml"))
    (hook,) = [h for repo in config["repos"] for h in repo["hooks"] if h["id"] == "commit-subject-length"]
    assert hook["language"] == "pygrep" and hook["stages"] == ["commit-msg"]
    assert "commit-msg" in config["default_install_hook_types"]
    flags = re.MULTILINE | re.DOTALL if "--multiline" in hook["args"] else 0  # as pygrep compiles it
    too_long = re.compile(hook["entry"], flags)  # pygrep fails the commit when the pattern matches
    assert not too_long.search("x" * 72 + "\n\n" + "a body line may be longer " * 10 + "\n")
    assert too_long.search("x" * 73 + "\n\nbody\n")
    assert not too_long.search("short subject\n\n" + "y" * 200 + "\n")
