"""Issue 29: ``deploy.launch.register_sites`` registers every site's SuperNode key with ONE process
(``deploy.launch.register_keys``: one Control API client through the operator socket) instead of a
``flwr supernode register`` process per site (100 sites: ~8 min of CPU-bound process starts on two
cores). Against a real SuperLink (TLS, SuperNode auth): 6 keys, one process, 6 distinct node ids
that ``flwr supernode ls`` lists; the same keys again answer "already registered" (None) and change
nothing; a file that is no key is refused naming its site while the good keys of the same call are
registered and recorded.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy import launch, tls
from deploy.launch.errors import LaunchError
from deploy.launch.processes import free_port

pytestmark = pytest.mark.integration  # a real flower-superlink


def test_register_sites_uses_one_process_for_every_key(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "fed"
    sites = [f"s{i}" for i in range(6)]
    launch.start_superlink(work, port=free_port(), sites=[])
    try:
        keys = {s: tls.make_supernode_keys(tmp_path / "keys", s).public_key for s in sites}
        calls: list[list[str]] = []
        real = subprocess.run

        def counting(cmd, *a, **kw):
            calls.append([str(c) for c in cmd])
            return real(cmd, *a, **kw)

        monkeypatch.setattr(subprocess, "run", counting)
        got = launch.register_sites(work, keys)
        registering = [c for c in calls if "deploy.launch.register_keys" in c or "register" in c]
        assert len(registering) == 1, registering  # one process for all six keys
        assert sorted(got) == sites and len({v for v in got.values()}) == 6
        assert all(isinstance(v, int) for v in got.values())
        monkeypatch.undo()
        listed = launch.supernode_status(Path(launch.load_state(work)["flwr_home"]))
        assert set(got.values()) <= set(listed)

        # again: every key answers "already registered"; the recorded ids stay
        again = launch.register_sites(work, keys)
        assert again == got

        # a bad key file is refused naming its site; the good key of the same call is registered
        bad = tmp_path / "bad.pub"
        bad.write_text("not a key\n")
        late = tls.make_supernode_keys(tmp_path / "keys", "late").public_key
        with pytest.raises(LaunchError, match="'broken'"):
            launch.register_sites(work, {"broken": bad, "late": late})
        assert isinstance(launch.load_state(work)["registered"].get("late"), int)
    finally:
        launch.down(work)
