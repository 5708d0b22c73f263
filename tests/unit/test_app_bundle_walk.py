"""The app handed to ``flwr run`` and the hash a site pins skip ``.gitignore``d directories
(``client.pin.app_files``, ``deploy.launch.appdir.staged_app``): flwr's own walk enters every one
(a checkout's ``.venv`` is ~65,000 files, ~5 s of CPU per run). The bundle must stay byte-identical
to the one ``flwr build`` makes from the directory as it is, whatever the ``.gitignore`` says.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client.pin import app_files, fab_sha256
from deploy.launch.appdir import staged_app

REPO = Path(__file__).resolve().parents[2]


def _app(root: Path, gitignore: str | None) -> Path:
    app = root / "app"
    for rel in ("common/a.py", "client/b.py", "server/c.py", "server/sub/d.py", "docs/notes.md"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(f"# {rel}\n")
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")
    venv = app / ".venv" / "lib" / "common"  # would match common/**/*.py if it were not ignored
    venv.mkdir(parents=True)
    for i in range(50):
        (venv / f"m{i}.py").write_text("x = 1\n")
    (app / ".venv" / "keep.py").write_text("kept = True\n")
    (app / "server" / "__pycache__").mkdir()
    (app / "server" / "__pycache__" / "c.cpython-311.pyc").write_bytes(b"\0")
    if gitignore is not None:
        (app / ".gitignore").write_text(gitignore)
    return app


def _flwr_hash(path: Path) -> str:
    return hashlib.sha256(build_fab_from_disk(path)).hexdigest()


@pytest.mark.parametrize(
    "gitignore",
    [
        ".venv/\n__pycache__/\n*.pyc\n",  # the repository's kind: ignored directories are skipped
        ".venv/\n!.venv/keep.py\n__pycache__/\n",  # a negation: nothing may be skipped
        None,  # no .gitignore at all
        "server/sub/\n",  # an ignored directory the bundle would otherwise take files from
    ],
)
def test_the_pinned_hash_and_the_staged_app_are_the_bundle_flwr_builds(tmp_path, gitignore):
    app = _app(tmp_path, gitignore)
    want = _flwr_hash(app)
    assert fab_sha256(app) == want
    with staged_app(app) as src:
        assert src != app and _flwr_hash(src) == want
        staged = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert not src.exists(), "the staged copy outlived the call"
    assert not any(p.startswith(".venv/") for p in staged), staged
    if gitignore and ".venv/" in gitignore and "!" not in gitignore:
        assert not any(p.startswith(".venv/") for p in app_files(app))


def test_an_app_that_cannot_be_listed_is_handed_over_as_it_is(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text("[project\n")
    with staged_app(broken) as src:
        assert src == broken
    with staged_app(tmp_path / "missing") as src:
        assert src == tmp_path / "missing"


def test_the_repository_bundle_is_unchanged_by_the_pruned_walk():
    """This checkout (with its .venv, runs/ and caches): the same bundle, from a fraction of the walk."""
    with staged_app(REPO) as src:
        assert _flwr_hash(src) == fab_sha256(REPO)
        assert (src / "pyproject.toml").is_file() and (src / "server" / "app.py").is_file()
