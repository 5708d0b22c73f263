"""The console's configuration without a browser or a process: a non-loopback console needs TLS and
a token, which is kept private. (The console in a real browser: tests/integration/test_console.py.)
"""

from __future__ import annotations

import argparse
import os

import pytest

from server.console.cli import ConsoleConfigError, load_or_create_token, plan


def test_non_loopback_needs_tls_and_token(tmp_path):
    args = argparse.Namespace(
        registry=str(tmp_path / "reg"), host="0.0.0.0", port=1, certfile=None, keyfile=None, token_file=None
    )
    with pytest.raises(ConsoleConfigError, match="requires TLS"):
        plan(args)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    args.certfile, args.keyfile = str(cert), str(key)
    p = plan(args)
    assert p["tls"] and p["token"] and p["token_file"] == str(tmp_path / "reg.console-token")
    assert (tmp_path / "reg.console-token").stat().st_mode & 0o777 == 0o600
    assert plan(args)["token"] == p["token"]  # reused
    os.chmod(tmp_path / "reg.console-token", 0o644)
    with pytest.raises(ConsoleConfigError, match="other users could read it"):
        load_or_create_token(tmp_path / "reg.console-token")
    loop = argparse.Namespace(
        registry=str(tmp_path / "reg"), host="127.0.0.1", port=1, certfile=None, keyfile=None, token_file=None
    )
    assert plan(loop) == {"tls": False, "token": None, "token_file": None}
