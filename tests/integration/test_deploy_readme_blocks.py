"""deploy/README.md blocks that no other test ran from the document, run as written, command by
command (read with ``tests/support/doc_commands.py``, never copied):

- "The hardened setup": an operator CA and certificate (``python -m deploy.tls --operator``), the
  SuperLink behind nginx with ``--operator-ca``, and ``curl`` with that certificate to the Control
  API through the proxy (prints 200; without the certificate 403, with another operator CA's 400);
- "The operator credential ...": ``--run-as`` / ``--operator-group`` and ``usermod``, after which
  the named operator reaches the Control API through the socket (``python -m deploy.flwr_main``)
  and an account outside the group cannot;
- "Simulation": ``flwr run . local`` with the local simulation federation enrols every site.

Rewrites, each an explicit ``str.replace`` in ``REWRITES`` / the test: ``/srv/rpe`` (and the
simulation's ``/tmp``, ``/models``, ``/data``) to the test's folders, ``python`` / ``flwr`` to this
interpreter's, and the host name ``coord`` resolved to loopback for curl. Servers run in a network
namespace of their own (``support.netns``), so ``0.0.0.0:9093`` as written binds there only; they
are stopped by PID (``deploy.launch down``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import netns
from support.doc_commands import section_commands

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "deploy" / "README.md"
BIN = Path(sys.executable).parent


def _shell(cmd: str, tmp: Path, prefix: list[str], env: dict[str, str], timeout: float = 90) -> str:
    """Run one logical command of the guide with bash (its pipes, redirections and comments as
    written) after the test's path rewrites; it must exit 0. Returns stdout."""
    line = cmd.replace("/srv/rpe", str(tmp))
    if line.startswith("python "):
        line = f"{sys.executable} {line[len('python ') :]}"
    res = subprocess.run(
        [*prefix, "bash", "-c", line], cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{cmd}\n-> exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("FLWR_HOME", None)
    return env


@pytest.fixture
def srv():
    """The guide's ``/srv/rpe``: a folder every account can traverse (nginx's workers run as the
    system user ``rpe-proxy`` and must reach the operator socket; pytest's own tmp root is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="rpe-readme-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def coord_ns():
    """A network namespace of its own for the coordinator's servers (loopback only)."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    topo = netns.Topology(peers=()).create()
    try:
        yield topo
    finally:
        topo.remove()


def test_the_hardened_setup_block_runs_as_written(srv, coord_ns):
    cmds = section_commands(GUIDE, "The hardened setup")
    assert [c.split()[:3] for c in cmds] == [
        ["python", "-m", "deploy.tls"],
        ["python", "-m", "deploy.launch"],
        ["curl", "-sS", "-o"],
    ], cmds
    prefix, env = coord_ns.prefix("coord"), _env()
    workdir = srv / "coord"
    # the one name rewrite: `coord` (the coordinator's DNS name, its certificate's SAN) is loopback here
    resolve = "curl --resolve coord:9093:127.0.0.1 "
    try:
        for cmd in cmds:
            out = _shell(cmd.replace("curl ", resolve, 1), srv, prefix, env)
        assert out.strip() == "200", out  # what the guide says curl prints
        # each kind of missing credential, the same request otherwise: refused
        curl = cmds[-1].replace("curl ", resolve, 1)
        without = curl.replace(
            "--cert /srv/rpe/operator/operator-alice.crt --key /srv/rpe/operator/operator-alice.key", ""
        )
        assert without != curl
        assert _shell(without, srv, prefix, env).strip() == "403"
        _shell(cmds[0].replace("/srv/rpe/operator", "/srv/rpe/other-operator"), srv, prefix, env)
        other = curl.replace("/srv/rpe/operator/operator-alice", "/srv/rpe/other-operator/operator-alice")
        assert _shell(other, srv, prefix, env).strip() == "400"  # nginx refuses another CA's certificate
    finally:
        if (workdir / "launch-state.json").exists():
            subprocess.run(
                [sys.executable, "-m", "deploy.launch", "down", "--workdir", str(workdir)],
                env=env,
                capture_output=True,
                timeout=60,
            )
