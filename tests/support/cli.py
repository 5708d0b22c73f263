"""Run ``rpe`` (``deploy.cli.main``) in-process, as a user would from the shell: the exit code and
what it printed."""

from __future__ import annotations

import pytest

from deploy.cli import main


def rpe_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``rpe ARGV...``: (exit code, stdout, stderr); earlier captured output is discarded first."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    got = capsys.readouterr()
    return code, got.out, got.err


def rpe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``rpe ARGV...``: (exit code, stdout)."""
    code, out, _ = rpe_run(capsys, *argv)
    return code, out
