"""deploy/README.md blocks that no other test ran from the document, run as written, command by
command (read with ``tests/support/doc_commands.py``, never copied):

- "The hardened setup": an operator CA and certificate (``python -m deploy.tls --operator``), the
  SuperLink behind nginx with ``--operator-ca``, and ``curl`` with that certificate to the Control
  API through the proxy (prints 200; without the certificate 403, with another operator CA's 400);
- "The operator credential ...": ``--run-as`` / ``--operator-group`` and ``usermod``, after which
  the named operator reaches the Control API through the socket (``python -m deploy.flwr_main``)
  and an account outside the group cannot;
- "Simulation": ``flwr run . local`` with the local simulation federation enrols every site, and
  ``rpe registry ls`` lists one record per site (the guide's own way round flwr's 15 s start-up
  limit for the local SuperLink, an inline command, is read from the guide and used first).

Rewrites, each an explicit string replacement in the test: ``/srv/rpe`` (and the simulation's
``/tmp``, ``/models``, ``/data`` paths, its app ``.``, its ports, ``steps``) to the test's own,
``python`` / ``rpe`` to this interpreter, and the host name ``coord`` resolved to loopback for
curl. The coordinator's servers run in a network namespace of their own (``support.netns``), so
``0.0.0.0:9093`` as written binds there only; every server is stopped by PID (``deploy.launch
down``; the simulation's, found by their ``FLWR_HOME``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from support import netns, write_site_data
from support.doc_commands import section_blocks, section_commands
from support.procs import processes_with_env

from deploy import launch
from server.registry import Registry

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


# -- "Running the coordinator under its own account" ---------------------------------------------
def _closed_ancestor(path: Path) -> tuple[Path, Path] | None:
    """The highest directory above ``path`` others cannot enter, and its child on the way (the
    interpreter under /root, mode 0700, here)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
            return parent, next(p for p in [path, *path.parents] if p.parent == parent)
    return None


def _reachable_python(hold: Path) -> list[str]:
    """Command prefix: a private mount namespace where other accounts can run this interpreter
    (its closed ancestor replaced by a tmpfs holding only the interpreter's tree; invisible
    outside), then ``bash -c`` of the argument after it."""
    script = ["set -e"]
    closed = _closed_ancestor(Path(os.path.realpath(sys.executable)))
    if closed:
        top, child = closed
        script += [
            f"mkdir -p {hold}",
            f"mount --bind {child} {hold}",
            f"mount -t tmpfs -o mode=0755,size=1m tmpfs {top}",
            f"mkdir -p {child}",
            f"mount --bind {hold} {child}",
        ]
    script.append('exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]


def _unavailable_accounts() -> str | None:
    if os.geteuid() != 0:
        return "--run-as and usermod need root"
    for tool in ("setpriv", "unshare", "useradd", "usermod", "userdel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def test_the_run_as_block_runs_as_written_and_the_operator_group_opens_the_socket(srv, coord_ns):
    reason = _unavailable_accounts()
    if reason:
        pytest.skip(reason)
    blocks = [b for b in section_blocks(GUIDE, "The operator credential") if any("--run-as" in c for c in b.commands)]
    assert len(blocks) == 1, blocks
    cmds = list(blocks[0].commands)
    assert cmds[0].startswith("python -m deploy.launch superlink") and cmds[1].startswith("usermod -aG"), cmds
    operator = cmds[1].split()[3]  # the guide's operator (alice): made here when this machine has none
    made = subprocess.run(["id", operator], capture_output=True).returncode != 0
    if made:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", operator], check=True
        )
    env, workdir = _env(), srv / "coord"
    hold = Path("/tmp") / f"rpe-hold-{os.getpid()}"
    try:
        _shell(cmds[0], srv, [*coord_ns.prefix("coord"), *_reachable_python(hold)], env)
        _shell(cmds[1], srv, [], env)
        registry = srv / "registry"
        account = subprocess.run(["id", "-u", "rpe-coord"], capture_output=True, text=True, check=True).stdout.strip()
        assert str(registry.stat().st_uid) == account and oct(registry.stat().st_mode & 0o777) == "0o700"
        assert (registry / "coordinator.pub").is_file()  # the key the sites pin, made up front
        # what the guide says usermod gives: the operator's flwr through the socket answers ...
        ls = f"{sys.executable} -m deploy.flwr_main ls rpe --format json"
        flwr_env = {**env, "FLWR_HOME": str(workdir / "flwr-home"), "HOME": str(srv)}
        as_operator = ["setpriv", f"--reuid={operator}", f"--regid={operator}", "--init-groups", "--"]
        res = subprocess.run(
            [*_reachable_python(hold), *as_operator, "bash", "-c", ls],
            env=flwr_env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert res.returncode == 0 and '"success": true' in res.stdout, f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        # ... and an account outside the group, given the socket itself, gets no further than its directory
        sock = json.loads((workdir / "launch-state.json").read_text())["socket"]
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        res = subprocess.run(
            [*_reachable_python(hold), *nobody, "bash", "-c", ls],
            env={**flwr_env, "RPE_SUPERLINK_SOCKET": sock},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert res.returncode == 1 and '"success": true' not in res.stdout, res
        assert "permission denied on the operator socket" in res.stderr and "usermod -aG" in res.stderr, res.stderr
    finally:
        if (workdir / "launch-state.json").exists():
            subprocess.run(
                [sys.executable, "-m", "deploy.launch", "down", "--workdir", str(workdir)],
                env=env,
                capture_output=True,
                timeout=60,
            )
        if made:
            subprocess.run(["userdel", operator], capture_output=True)
        with contextlib.suppress(OSError):
            hold.rmdir()


# -- "Simulation" ------------------------------------------------------------------------------------
SIM_SITES = {"a": "ct-head", "b": "mr-head", "c": "ct-head"}


@pytest.mark.slow  # Ray and the local SuperLink start: 336 s at load average 37 on two cores
def test_the_simulation_block_enrols_every_site(tmp_path, tiny_model_dir):
    """As written before, the block "succeeded" (flwr exit 0) and enrolled nothing: the local
    SuperLink's per-run ``uv sync`` failed (exit 608), and without ``require-signatures=false``
    every simulated site (no signing key) was refused."""
    cmds = section_commands(GUIDE, "Simulation")
    assert [c.split()[0] for c in cmds] == ["mkdir", "FLWR_HOME=$PWD/sim-home", "rpe"], cmds
    write_site_data(tmp_path / "data" / "sites", SIM_SITES, n=14, n_eval=2)  # 12 reports: z-min-examples 10
    http, control = launch.free_port(), launch.free_port()
    while control == http:
        control = launch.free_port()
    # the rewrites: the guide's placeholder paths, the app (`.`: this repository), python, free ports
    # for the local SuperLink (other tests run beside this one), and a short training (steps)
    paths = {
        "/tmp/reg": str(tmp_path / "reg"),
        "/tmp/sites": str(tmp_path / "sim-site-root"),
        "/models/m": str(tiny_model_dir),
        "/data/sites": str(tmp_path / "data" / "sites"),
        "flwr run . ": f"flwr run {REPO} ",
        "mode='enroll' ": "mode='enroll' steps=2 max-length=96 chroma='off' ",
        "rpe ": f"{sys.executable} -m deploy.cli ",
        "127.0.0.1:39093": f"127.0.0.1:{control}",
        "--port 39091": f"--port {http}",
    }
    pattern = re.compile("|".join(re.escape(k) for k in paths))

    def rewrite(cmd: str) -> str:
        return pattern.sub(lambda m: paths[m.group(0)], cmd)

    env = {
        **_env(),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    }
    home = tmp_path / "sim-home"
    try:
        _shell(cmds[0], tmp_path, [], env)
        # flwr gives its local SuperLink 15 s, too short on a busy two-core machine: the guide's own
        # way round it (its inline command, read from the guide), so the run does not depend on load
        section = GUIDE.read_text().split("## Simulation", 1)[1].split("\n## ", 1)[0]
        (start,) = re.findall(r"`(mkdir -p sim-home/local-superlink && flower-superlink [^`]+)`", section)
        started = {**env, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        link = launch.popen_tied(
            ["bash", "-c", rewrite(" ".join(start.split())).replace("&& flower-superlink", "&& exec flower-superlink")],
            cwd=tmp_path,
            env=started,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and link.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"the local SuperLink did not answer /health (exit {link.poll()})")
        out = _shell(rewrite(cmds[1]), tmp_path, [], env, timeout=400)
        if not list((tmp_path / "reg" / "runs").glob("*-enroll.json")):
            # flwr exits 0 also when Flower's runtime failed the run before the ServerApp ran (seen on
            # a starved machine; test_simulation.py describes it): once more, saying what happened
            print(f"the enroll run left no report; flwr said:\n{out[-3000:]}", file=sys.stderr)
            out = _shell(rewrite(cmds[1]), tmp_path, [], env, timeout=400)
        assert list((tmp_path / "reg" / "runs").glob("*-enroll.json")), f"no enroll report twice:\n{out[-3000:]}"
        listing = _shell(rewrite(cmds[2]), tmp_path, [], env)
        with Registry(tmp_path / "reg", read_only=True, chroma="off") as reg:
            records = reg.list()
        assert sorted(r.meta.site for r in records) == sorted(SIM_SITES), f"{out[-3000:]}\n{listing}"
        assert all(r.id in listing for r in records), listing  # what the guide's check prints
        # the guide: "flwr run ... local leaves a SuperLink and a SuperExec running afterwards: stop
        # them by PID (`python -c ...`)": its command, for each
        (stop,) = re.findall(r'`(python -c "from deploy\.launch import stop_process; [^`]+)`', section)
        left = processes_with_env(f"FLWR_HOME={home}")
        assert left, "the guide says the local SuperLink keeps running"
        for pid, _ in left:
            _shell(stop.replace("PID", str(pid)), tmp_path, [], env)
        assert not processes_with_env(f"FLWR_HOME={home}")
    finally:
        for pid, start_time in processes_with_env(f"FLWR_HOME={home}"):
            launch.stop_process(pid, start_time, 15)
