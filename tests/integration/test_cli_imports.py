"""What the ``rpe`` console script imports, each in a fresh Python process: ``rpe --help`` none of the heavy
libraries, the auditor's commands no torch. (The CLI in this process: tests/unit/test_cli.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "chromadb", "flwr", "peft")


@pytest.mark.integration
def test_console_script_starts_without_heavy_imports():
    code = (
        "import sys; from deploy.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "registry" in res.stdout
    assert "HEAVY=\n" in res.stdout, f"`rpe --help` imported {res.stdout.rsplit('HEAVY=', 1)[-1].strip()}"


@pytest.mark.integration
def test_auditor_commands_do_not_import_torch(tmp_path: Path) -> None:
    """`rpe audit verify / report` (which ask the family table for every family under the root) and
    `rpe registry ls` open a registry without torch (seconds of import on a small machine for tools
    that never touch a tensor)."""
    from support.registry import new_registry

    root = tmp_path / "reg"
    new_registry(root).close()
    probe = (
        "import sys; from deploy.cli import main\n"
        f"for argv in (['audit', 'verify', '--log', {str(root / 'audit.jsonl')!r}, '--registry', {str(root)!r}],"
        f" ['audit', 'verify', '--registry', {str(root)!r}], ['audit', 'report', '--registry', {str(root)!r}],"
        f" ['registry', 'ls', '--registry', {str(root)!r}]):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("no torch"), out.stdout
