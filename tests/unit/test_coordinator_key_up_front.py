"""``deploy.launch`` makes the coordinator key up front (issue: the demo printed, per site,
"--coordinator-key ... does not exist (yet)"), as ``rpe coordinator init`` does, and the registry
the first run creates around it (either task family) signs with that same key.

``make_coordinator_key`` is what ``start_superlink`` (so ``up`` and ``superlink``) runs for a
registry; ``test_up_coordinator_key.py`` runs ``up`` itself.
"""

from __future__ import annotations

import pytest
from support import make_tiny_sam

from common.trust.signing import load_public_key
from common.trust.statements import sign_statement, verify_statement
from deploy.launch.coordinator import coordinator_public_key, make_coordinator_key
from deploy.launch.errors import LaunchError
from server import coordkey as server_key
from server.bootstrap import open_registry
from server.settings import Settings

FAMILIES = ("report-text", "segmentation")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_first_run_creates_the_registry_around_the_key_made_up_front(family, tmp_path, tiny_model_dir):
    root = tmp_path / "registry"  # does not exist yet, as in the demo
    pub = make_coordinator_key(root)
    assert pub == coordinator_public_key(root) and pub.is_file()
    assert oct((root / "coordinator.key").stat().st_mode & 0o777) == "0o600"
    pinned = pub.read_bytes()
    assert make_coordinator_key(root) == pub and pub.read_bytes() == pinned  # never replaced
    model = tiny_model_dir if family == "report-text" else make_tiny_sam(tmp_path / "sam")
    rc = {"mode": "enroll", "task": family, "registry-dir": str(root), "base-model": str(model), "chroma": "off"}
    reg = open_registry(Settings.from_run_config(rc, env={}))  # what the ServerApp's first run does
    try:
        where = reg.path
        assert (where / "registry.json").is_file()
        assert where == root if family == "report-text" else where == root / "segmentation"
    finally:
        reg.close()
    assert pub.read_bytes() == pinned  # the registry kept the key
    # what the registry signs a delivery with verifies against the file the sites pin
    statement = sign_statement(server_key.load_or_create(where), "delivery", {"target": "x", "sha256": "ab" * 32})
    assert verify_statement(load_public_key(pub), statement, "delivery")["target"] == "x"


@pytest.mark.parametrize("half", ["coordinator.key", "coordinator.pub"])
def test_half_a_key_pair_is_refused_and_left_alone(half, tmp_path):
    root = tmp_path / "registry"
    make_coordinator_key(root)
    other = "coordinator.pub" if half == "coordinator.key" else "coordinator.key"
    kept = (root / half).read_bytes()
    (root / other).unlink()
    with pytest.raises(LaunchError, match=f"holds {half} but not {other}: restore"):
        make_coordinator_key(root)
    assert (root / half).read_bytes() == kept and not (root / other).exists()
