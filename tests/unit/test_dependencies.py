"""Every third-party package the shipped code imports is declared, so a fresh install has it.

Why: a package that arrives only as some other package's dependency (python-multipart for the
console's uploads, tomli_w through flwr) is there on the machine that wrote the code and missing
on the next one; CI then fails far from the cause. An import guarded by ``except ImportError`` is
optional and exempt.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("common", "server", "client", "deploy")
FIRST_PARTY = set(SHIPPED) | {"benchmarks", "tests"}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True when the import sits in a ``try`` whose handlers catch ImportError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def imported_top_levels() -> dict[str, str]:
    """{top-level module: first file importing it} over the shipped packages, unguarded imports only."""
    found: dict[str, str] = {}
    for path in sorted(p for pkg in SHIPPED for p in (ROOT / pkg).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            if _guarded(node, parents):
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    names = set()
    for req in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (ROOT / req).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                names.add(_norm(re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0]))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_shipped_import_is_declared_in_requirements() -> None:
    dists = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = []
    for top, where in imported_top_levels().items():
        owners = {_norm(d) for d in dists.get(top, [])}
        assert owners, f"{where} imports {top!r}, which no installed distribution provides"
        if not owners & declared:
            missing.append(f"{top} (distribution {', '.join(sorted(owners))}; imported in {where})")
    assert not missing, "imported but not declared in requirements.txt: " + "; ".join(missing)


def test_pyproject_declares_what_requirements_declares() -> None:
    """pip install . (pyproject) and pip install -r requirements.txt give the same runtime set."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    in_pyproject = {_norm(re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    in_pyproject |= {
        _norm(re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0])
        for extra in project.get("optional-dependencies", {}).values()
        for d in extra
    }
    assert declared_distributions() - in_pyproject == set()


def test_every_venv_tool_the_checks_run_is_declared() -> None:
    """A tool CI or pre-commit calls as ``.venv/bin/<tool>`` (ruff, lint-imports, mypy, pre-commit) is
    installed by a distribution that requirements.txt names, so setup.sh puts it on the next machine."""
    callers = [
        *sorted((ROOT / "scripts").glob("*.sh")),
        ROOT / ".pre-commit-config.yaml",
        *sorted((ROOT / ".ci").glob("*")),
    ]
    tools: dict[str, str] = {}
    for path in callers:
        for tool in re.findall(r"\.venv/bin/([A-Za-z0-9_.-]+)", path.read_text()):
            if tool not in ("python", "python3", "pip", "pip3"):  # the venv itself provides these
                tools.setdefault(tool, str(path.relative_to(ROOT)))
    assert tools, "no .venv/bin tool found in scripts/, .pre-commit-config.yaml or .ci/"
    installers: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        for f in dist.files or ():
            if f.parent.name == "bin" and f.name in tools:
                installers.setdefault(f.name, set()).add(_norm(dist.metadata["Name"]))
    declared = declared_distributions()
    problems = []
    for tool, where in sorted(tools.items()):
        owners = installers.get(tool, set())
        if not owners:
            problems.append(f"{tool} (called in {where}) is installed by no distribution in .venv")
        elif not owners & declared:
            problems.append(f"{tool} (called in {where}) comes from {sorted(owners)}, not in requirements.txt")
    assert not problems, "; ".join(problems)
