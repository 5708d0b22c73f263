"""Issue 26, class 3: no local user of the coordinator host runs code as the coordinator.

Before: the SuperLink's Control API listened on loopback (one-machine setup) or nginx forwarded it
from loopback (hardened setup), and "is loopback" was the only credential: uid 65534 with the
public ``ca.crt`` registered a node and ``flwr run`` an app whose ServerApp ran as root with
``RPE_REGISTRY`` in its environment. Now the Control and Runtime APIs answer only on a Unix socket
in a directory owned by the coordinator's account (``deploy/operator_socket.py``), the TCP ports
answer only the Fleet API (nginx forwards the Control API only to holders of an operator client
certificate), and ``--run-as`` runs the SuperLink and every ServerApp under their own account with
the registry readable by it alone.

The end-to-end tests run as root (they switch users): ``tests/support/local_user_scenario.py`` in a
private mount namespace, where the virtual environment's interpreter is made reachable for other
accounts when a directory above it is closed (here it lives under ``/root``, mode 0700; the mount
is invisible outside the test). Everything runs on loopback, is bounded in time and stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "tests" / "support" / "local_user_scenario.py"
ACCOUNT = "rpe-coord"


# -- end to end, as root -----------------------------------------------------------------------
def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "switching to uid 65534 and to the coordinator's account needs root"
    for tool in ("setpriv", "unshare", "useradd"):
        if shutil.which(tool) is None:
            return f"util-linux/passwd `{tool}` is not installed"
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if probe.returncode != 0:
        return f"the kernel refused a private mount namespace or a uid switch: {probe.stderr.strip()[:200]}"
    return None


def _closed_ancestor(path: Path) -> tuple[Path, Path] | None:
    """The highest directory above ``path`` that others cannot enter, and its child on the way."""
    parts = path.parents
    for parent in reversed(parts):
        if parent == Path("/"):
            continue
        if not os.stat(parent).st_mode & 0o001:
            child = next(p for p in [path, *parts] if p.parent == parent)
            return parent, child
    return None


def _run_scenario(setup: str, run_as: str) -> dict:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    shell = ["set -e"]
    closed = _closed_ancestor(Path(os.path.realpath(sys.executable)))
    if closed:  # e.g. /root (0700) above a pyenv interpreter: open only the interpreter's tree
        top, child = closed
        hold = Path("/tmp") / f"rpe-hold-{os.getpid()}"
        shell += [
            f"mkdir -p {hold}",
            f"mount --bind {child} {hold}",
            f"mount -t tmpfs -o mode=0755,size=1m tmpfs {top}",
            f"mkdir -p {child}",
            f"mount --bind {hold} {child}",
        ]
    shell.append(f'exec "{sys.executable}" "{SCENARIO}" {setup} {run_as}')
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(shell)],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    if closed:
        try:
            (Path("/tmp") / f"rpe-hold-{os.getpid()}").rmdir()
        except OSError:
            pass
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.returncode == 0 and lines, f"rc={res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return json.loads(lines[-1])


def _assert_attacker_got_nothing(r: dict) -> None:
    for name, attempt in r["attacker_flwr"].items():
        assert not attempt.get("success"), (name, attempt)
    http = r["attacker_http"]
    for key, status in http.items():
        if key == "socket":
            assert "PermissionError" in status and "errno 13" in status, http
        elif "/v1/fleet/" not in key:  # the Fleet API answers (SuperNode auth refuses the request)
            assert status in (403, 404), (key, http)
    assert r["attacker_reads_registry"]["rc"] != 0 and "PermissionError" in str(r["attacker_reads_registry"])
    assert r["nodes_unchanged"], r
    assert r["runs_before_operator"] == 0, r  # the attacker's runs never existed


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("setup", ["one-machine", "hardened"])
def test_a_local_user_can_neither_register_a_node_nor_run_an_app(setup):
    """uid 65534 on the coordinator host, with only ``ca.crt``: ``flwr supernode register`` and
    ``flwr run`` fail against every TCP port and through the socket (EACCES), raw Control/Runtime
    requests answer 403/404, the registry is unreadable, nothing was registered or run. The
    operator's own registration and run succeed, and the ServerApp runs as the coordinator's
    account, not as root."""
    r = _run_scenario(setup, ACCOUNT)
    _assert_attacker_got_nothing(r)
    uid, gid = r["account"]
    assert uid != 0 and r["superlink_uid"] == uid
    assert r["registry_mode"] == "0o700" and r["registry_uid"] == uid
    assert isinstance(r["operator_register"]["a"], int), r
    assert r["operator_run_submitted"][0], r
    app = r["serverapp"]
    assert app is not None, r
    assert (app["uid"], app["euid"], app["gid"]) == (uid, uid, gid) and app["groups"] in ([], [gid]), app
    assert app["registry_listable"], app


@pytest.mark.slow
@pytest.mark.integration
def test_without_run_as_the_socket_still_keeps_local_users_out():
    """The launcher's own account (root here; the invoking user in the one-machine demo): the socket
    directory is 0700, so a local user still cannot register or run (the ServerApp runs as the
    launcher's user, which is what ``--run-as`` exists to avoid)."""
    r = _run_scenario("one-machine", "-")
    _assert_attacker_got_nothing(r)
    assert r["serverapp"] is not None and r["serverapp"]["uid"] == 0
