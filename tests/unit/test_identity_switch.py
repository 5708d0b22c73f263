"""Issue 26 class 7: node binding does not depend on ``require-signatures``.

With ``require-signatures=false`` an unsigned whoami claim was accepted for a site whose SuperNode
key is recorded (the impostor then received that site's ``query.embed`` and ``train.apply``), and
the refusal message itself recommended switching signatures off. Real allow-list and SuperNode key
files; the coordinator's own ``verify_identity``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.trust.signing import generate_keypair
from deploy import tls
from server.allowlist import AllowList
from server.messaging import IdentityRefused, verify_identity

RUN = "run-1"


def _allow(tmp: Path, *, node_keys: bool, signing: bool = True) -> AllowList:
    allow = AllowList(tmp / "allowlist.json")
    for site in ("a", "b"):
        if signing:
            _, pub = generate_keypair(tmp / "keys" / site, site)
            allow.add(site, pub.read_text())
        if node_keys:
            nk = tls.make_supernode_keys(tmp / "supernode-keys" / site, site)
            allow.node_keys.add(site, nk.public_key.read_text())
    return allow


def _unsigned(site: str = "a") -> dict:
    return {"site": site, "identity": "", "nonce": "n"}


@pytest.mark.parametrize("require", [False, True])
def test_unsigned_claim_refused_when_node_key_recorded(tmp_path: Path, require: bool) -> None:
    allow = _allow(tmp_path, node_keys=True, signing=False)
    with pytest.raises(IdentityRefused) as err:
        verify_identity(_unsigned(), 7, RUN, "c" * 64, allow, require)
    msg = str(err.value)
    assert "SuperNode key" in msg and "does not depend on require-signatures" in msg
    assert "require-signatures=false" not in msg


@pytest.mark.parametrize("require", [False, True])
def test_unsigned_claim_refused_for_a_site_with_a_signing_key(tmp_path: Path, require: bool) -> None:
    allow = _allow(tmp_path, node_keys=False)
    with pytest.raises(IdentityRefused) as err:
        verify_identity(_unsigned(), 7, RUN, "c" * 64, allow, require)
    assert "signing key on the allow-list" in str(err.value)
    assert "give the site its key" in str(err.value)


def test_required_signature_message_does_not_recommend_switching_it_off(tmp_path: Path) -> None:
    allow = AllowList(tmp_path / "allowlist.json")  # no keys for site "z"
    with pytest.raises(IdentityRefused) as err:
        verify_identity(_unsigned("z"), 7, RUN, "c" * 64, allow, True)
    assert "without a signed identity statement" in str(err.value)
    assert "require-signatures=false" not in str(err.value)
    assert "give the site its key" in str(err.value)


def test_keyless_site_without_binding_still_joins_unsigned_when_allowed(tmp_path: Path) -> None:
    allow = AllowList(tmp_path / "allowlist.json")
    info = _unsigned("z")
    assert verify_identity(info, 7, RUN, "c" * 64, allow, False) is False
    assert verify_identity(_unsigned("z"), 7, RUN, "c" * 64, None, False) is False
