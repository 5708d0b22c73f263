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

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import setuptools
import tomllib

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


# -- integration: build, install outside the checkout, import ------------------------------------------

PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys, traceback
    from pathlib import Path
    modules = json.loads(sys.argv[1])
    out = {"sys_path": sys.path, "modules": {}}
    for name in modules:
        try:
            if name.rsplit(".", 1)[-1] == "__main__":
                # running it would start the program: locate and compile it instead
                spec = importlib.util.find_spec(name)
                compile(Path(spec.origin).read_text(), spec.origin, "exec")
                out["modules"][name] = {"file": spec.origin}
            else:
                out["modules"][name] = {"file": importlib.import_module(name).__file__}
        except BaseException:
            out["modules"][name] = {"error": traceback.format_exc(limit=4)}
    import client.app, server.app
    out["apps"] = [[c.__name__ for c in type(m.app).__mro__] for m in (server.app, client.app)]

    # the base model's first conversion reads its config and tokenizer from the installed package
    from transformers import AutoConfig
    from common.models import SMOLLM2_TOKENIZER_DIR, TOKENIZER_FILES
    AutoConfig.from_pretrained(SMOLLM2_TOKENIZER_DIR)
    out["tokenizer"] = [str(SMOLLM2_TOKENIZER_DIR), [n for n in TOKENIZER_FILES if not (SMOLLM2_TOKENIZER_DIR / n).is_file()]]

    # the console renders its pages and serves its stylesheet from the installed package
    import tempfile
    from starlette.testclient import TestClient
    from server.console.app import create_app
    from server.registry import Registry
    reg_dir = Path(tempfile.mkdtemp()) / "reg"
    reg = Registry.init(reg_dir, base_fingerprint="sha256:" + "34" * 32, module_shapes={"m.q_proj": (4, 4)},
                        embedding_dim=8, chroma_host=None)
    getattr(reg, "close", lambda: None)()
    web = TestClient(create_app(reg_dir))
    out["console"] = {url: [r.status_code, r.headers.get("content-type", ""), r.text[:2000]]
                      for url in ("/", "/registry", "/static/console.css") for r in [web.get(url)]}
    print("PROBE " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip install .`` would install, built from a copy of the working tree (the build
    writes build/ and *.egg-info, which must not land in the checkout others are editing)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_copy_ignore, symlinks=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["--disable-pip-version-check", "-w", str(base / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (whl,) = (base / "dist").glob("rpe_federation-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment outside the checkout with the wheel installed. No network: the
    third-party dependencies are the checkout venv's, reached through a ``.pth`` line naming its
    site-packages (a plain path line: that folder's own ``.pth`` files, among them the editable
    install's finder that maps ``common`` to the checkout, are not run)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "zz-checkout-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
        + ["--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    return env_dir


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", ANONYMIZED_TELEMETRY="False")
    env["HOME"] = str(home)  # nothing the imports cache lands in the real home
    return env


def _wheel_modules(wheel: Path) -> list[str]:
    """Every module the wheel ships, from its RECORD (the list pip installs)."""
    with zipfile.ZipFile(wheel) as zf:
        (record,) = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        paths = [line.split(",")[0] for line in zf.read(record).decode().splitlines() if line]
    names = []
    for p in paths:
        if p.endswith(".py"):
            parts = p[: -len(".py")].split("/")
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


@pytest.mark.integration
def test_wheel_ships_every_package_and_data_file_but_no_tests(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert _packages_on_disk() <= packages, f"missing from the wheel: {sorted(_packages_on_disk() - packages)}"
    assert not _data_files_on_disk() - names, f"missing from the wheel: {sorted(_data_files_on_disk() - names)}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(SHIPPED), f"the wheel's top-level folders are {sorted(tops)}, expected {SHIPPED}"
    assert any(n.startswith("server/console/templates/") and n.endswith(".html") for n in names)
    assert "server/console/static/console.css" in names


@pytest.mark.integration
def test_installed_wheel_imports_every_module_and_runs(wheel: Path, venv: Path, tmp_path: Path) -> None:
    modules = _wheel_modules(wheel)
    for needed in ("server.app", "client.app", "deploy.cli", "server.console.app", "server.registry"):
        assert needed in modules, f"{needed} is not in the wheel"
    python = venv / "bin" / "python"
    env = _clean_env(tmp_path)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    proc = subprocess.run(
        [str(python), str(probe), json.dumps(modules)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, f"the probe failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = json.loads(lines[-1][len("PROBE ") :])

    deps = Path(sysconfig.get_paths()["purelib"]).resolve()
    checkout = [
        p for p in out["sys_path"] if p and Path(p).resolve().is_relative_to(ROOT) and Path(p).resolve() != deps
    ]
    assert not checkout, f"the installed venv sees the checkout through sys.path {checkout}"
    failed = {m: r["error"] for m, r in out["modules"].items() if "error" in r}
    assert not failed, "modules of the installed wheel that do not import:\n" + "\n".join(
        f"--- {m}\n{e}" for m, e in failed.items()
    )
    site = venv.resolve()
    elsewhere = {m: r["file"] for m, r in out["modules"].items() if not Path(r["file"]).resolve().is_relative_to(site)}
    assert not elsewhere, f"imported from outside the installed venv {site}: {elsewhere}"

    server_mro, client_mro = out["apps"]
    assert "ServerApp" in server_mro, f"server.app.app is a {server_mro[0]}, not a Flower ServerApp"
    assert "ClientApp" in client_mro, f"client.app.app is a {client_mro[0]}, not a Flower ClientApp"

    tokenizer_dir, missing_files = out["tokenizer"]
    assert Path(tokenizer_dir).resolve().is_relative_to(site), (
        f"the base model's tokenizer is read from {tokenizer_dir}"
    )
    assert not missing_files, f"the installed package lacks the base model's {missing_files} in {tokenizer_dir}"

    for url, (status, _ctype, _) in out["console"].items():
        assert status == 200, f"the installed console answered {status} on {url}"
    assert "text/css" in out["console"]["/static/console.css"][1]
    assert "/static/console.css" in out["console"]["/"][2], "the overview page is not the rendered template"
    templates = venv.glob("lib/python*/site-packages/server/console/templates/*.html")
    assert {p.name for p in templates} == {p.name for p in (ROOT / "server/console/templates").glob("*.html")}

    rpe = subprocess.run(
        [str(venv / "bin" / "rpe"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert rpe.returncode == 0, f"rpe --help exited {rpe.returncode}:\n{rpe.stdout}\n{rpe.stderr}"
    assert "usage" in rpe.stdout.lower()
