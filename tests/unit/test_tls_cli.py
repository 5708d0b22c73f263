"""``python -m deploy.tls`` run at a site makes the site's keys and never a second CA (issue 27)."""

from __future__ import annotations

from pathlib import Path

from deploy.tls import CA_CERT, CA_KEY, main


def test_site_keys_alone_make_no_ca(tmp_path: Path, capsys) -> None:
    out = tmp_path / "certs"
    assert main(["--out", str(out), "--site", "a"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_auth", "a_auth.pub"]
    assert (out / "a_auth").stat().st_mode & 0o777 == 0o600
    said = capsys.readouterr().out
    assert "No CA was made" in said and "rpe site init" in said
    before = (out / "a_auth").read_bytes()
    assert main(["--out", str(out), "--site", "a"]) == 0  # run again: the key is kept, not replaced
    assert (out / "a_auth").read_bytes() == before


def test_the_coordinator_still_gets_its_ca_and_server_certificate(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert main(["--out", str(out), "--host", "10.0.0.1", "--site", "a"]) == 0
    assert (out / CA_CERT).exists() and (out / CA_KEY).exists() and (out / "server.pem").exists()
    ca = (out / CA_CERT).read_bytes()
    assert main(["--out", str(out), "--site", "b"]) == 0  # where a CA is, it is reused, never remade
    assert (out / CA_CERT).read_bytes() == ca and (out / "b_auth").exists()
