"""The wheel, built, installed outside the checkout and imported. (The packaging configuration
against the tree: tests/unit/test_packaging.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from support.packaging import SHIPPED, _copy_ignore, _data_files_on_disk, _packages_on_disk

ROOT = Path(__file__).resolve().parents[2]


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
