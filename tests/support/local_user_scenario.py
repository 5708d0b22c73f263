"""Issue 26, class 3, run for real: an unprivileged local user of the coordinator host against a
coordinator started by ``deploy.launch`` (root runs this, in a private mount namespace made by
``tests/integration/test_local_user.py``). Prints one JSON object on its last line.

``python tests/support/local_user_scenario.py SETUP RUN_AS`` with SETUP ``one-machine`` (the SuperLink's
own port on loopback) or ``hardened`` (nginx on the public port, the SuperLink behind it), RUN_AS
an account name or ``-`` (the launcher's own, root).

The attacker is uid 65534 with no groups (``setpriv``), holding only the public ``ca.crt``: stock
``flwr`` against every TCP port of the coordinator, ``deploy.flwr_main`` against the operator
socket, raw HTTPS requests to the Control and Runtime APIs, and reads of the registry. The
operator (root) then registers a node and runs an app, whose ServerApp records who it ran as.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from deploy import launch, tls
from deploy.launch.flower_cli import operator_flwr

REPO = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]

PROBE_APP = '''
"""Test-only ServerApp: records the account it runs as and what it can see."""
import json
import os
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    reg = os.environ.get("RPE_REGISTRY", "")
    Path(str(context.run_config["out"])).write_text(json.dumps({
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "registry": reg, "registry_listable": bool(reg) and os.access(reg, os.R_OK | os.X_OK),
    }))
'''

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "localuserprobe"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "rpe-tests"

[tool.flwr.app.components]
serverapp = "probe:app"
clientapp = "probe:client"

[tool.flwr.app.config]
out = ""
"""

ATTACK_HTTP = r"""
import json, socket, ssl, sys
ca, targets, sock_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
out = {}
ctx = ssl.create_default_context(cafile=ca)
for host, port, path in targets:
    try:
        with socket.create_connection((host, port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/protobuf\r\n"
                           "Accept: application/protobuf\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode())
                head = s.recv(64).decode("latin-1")
        out[f"{port}{path}"] = int(head.split()[1])
    except Exception as exc:
        out[f"{port}{path}"] = f"{type(exc).__name__}: {exc}"
try:
    c = socket.socket(socket.AF_UNIX)
    c.connect(sock_path)
    out["socket"] = "connected"
except OSError as exc:
    out["socket"] = f"{type(exc).__name__}: errno {exc.errno}"
print(json.dumps(out))
"""


def as_nobody(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd="/")


def json_tail(text: str) -> dict:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def main() -> None:
    setup, run_as = sys.argv[1], (None if sys.argv[2] == "-" else sys.argv[2])
    base = Path(tempfile.mkdtemp(prefix="rpe-local-user-", dir="/tmp"))
    base.chmod(0o755)  # the coordinator's account must reach its workdir (pytest's tmp is 0700)
    work, registry = base / "coord", base / "registry"
    result: dict = {"setup": setup, "run_as": run_as}
    port = launch.free_port()
    inner = launch.free_port() if setup == "hardened" else None
    try:
        t0 = time.monotonic()
        state = launch.start_superlink(
            work,
            port=port,
            registry=str(registry),
            allowlist=work / "allowlist.json",
            proxy=setup == "hardened",
            inner_port=inner,
            run_as=run_as,
            timeout=90,
        )
        result["startup_s"] = round(time.monotonic() - t0, 1)
        link_pid = state["superlink"]["pid"]
        result["superlink_uid"] = os.stat(f"/proc/{link_pid}").st_uid
        result["registry_mode"] = oct(os.stat(registry).st_mode & 0o777)
        result["registry_uid"] = os.stat(registry).st_uid
        sock = Path(state["socket"])
        flwr_home = Path(state["flwr_home"])
        nodes_before = launch.supernode_status(flwr_home)

        # the app both the attacker and the operator submit: a two-file probe (building a bundle of
        # this checkout would walk its .venv, ~5 s of CPU per `flwr run`, six times per scenario)
        app = base / "probe-app"
        app.mkdir()
        (app / "probe.py").write_text(PROBE_APP)
        (app / "pyproject.toml").write_text(PYPROJECT)

        # -- the attacker: uid 65534, only the public CA certificate -------------------------
        evil = base / "evil"
        evil.mkdir()
        shutil.copy(state["ca_cert"], evil / "ca.crt")
        key = tls.make_supernode_keys(evil / "keys", "evil")
        home = evil / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": "rpe",
                        "rpe": {"address": f"127.0.0.1:{port}", "root-certificates": str(evil / "ca.crt")},
                        "inner": {"address": f"127.0.0.1:{inner or port}", "root-certificates": str(evil / "ca.crt")},
                    }
                }
            )
        )
        for path in [evil, *evil.rglob("*")]:
            os.chown(path, 65534, 65534)
        env = {**launch.process_env(home), "HOME": str(evil)}
        env.pop("RPE_SUPERLINK_SOCKET", None)
        flwr = str(Path(sys.executable).parent / "flwr")
        attempts: dict[str, dict] = {}
        for name in ("rpe", "inner"):
            res = as_nobody([flwr, "supernode", "register", str(key.public_key), name, "--format", "json"], env)
            attempts[f"register-{name}"] = json_tail(res.stdout) or {"rc": res.returncode, "err": res.stderr[-300:]}
            res = as_nobody([flwr, "run", str(app), name, "--format", "json"], env, timeout=180)
            attempts[f"run-{name}"] = json_tail(res.stdout) or {"rc": res.returncode, "err": res.stderr[-300:]}
        sock_env = {**env, "RPE_SUPERLINK_SOCKET": str(sock)}
        res = as_nobody(
            [*operator_flwr(), "supernode", "register", str(key.public_key), "rpe", "--format", "json"], sock_env
        )
        attempts["register-socket"] = json_tail(res.stdout) or {"rc": res.returncode, "err": res.stderr[-300:]}
        res = as_nobody([*operator_flwr(), "run", str(app), "rpe", "--format", "json"], sock_env, timeout=180)
        attempts["run-socket"] = json_tail(res.stdout) or {"rc": res.returncode, "err": res.stderr[-300:]}
        result["attacker_flwr"] = attempts
        targets = [
            ["127.0.0.1", p, path]
            for p in sorted({port, inner or port})
            for path in (
                "/v1/control/list-runs",
                "/v1/control/start-run",
                "/v1/control/list-nodes",
                "/v1/runtime/pull-app-inputs",
                "/v1/fleet/pull-messages",
            )
        ]
        res = as_nobody([sys.executable, "-c", ATTACK_HTTP, str(evil / "ca.crt"), json.dumps(targets), str(sock)], env)
        result["attacker_http"] = json_tail(res.stdout) or {"rc": res.returncode, "err": res.stderr[-500:]}
        res = as_nobody([sys.executable, "-c", f"import os; print(os.listdir({str(registry)!r}))"], env)
        result["attacker_reads_registry"] = {"rc": res.returncode, "err": res.stderr.strip().splitlines()[-1:]}
        result["nodes_unchanged"] = launch.supernode_status(flwr_home) == nodes_before

        # -- the operator: root, through the socket -----------------------------------------
        good = tls.make_supernode_keys(base / "good-keys", "a")
        result["operator_register"] = launch.register_sites(work, {"a": good.public_key})
        runs = launch.flwr_cli(["ls", "rpe"], flwr_home)
        result["runs_before_operator"] = len(runs.get("runs", [])) if runs.get("success") else runs
        outdir = base / "out"
        outdir.mkdir()
        uid, gid = state["account"]
        os.chown(outdir, uid, gid)
        out = outdir / "probe.json"
        cfg = base / "run.toml"
        cfg.write_text(tomli_w.dumps({"out": str(out)}))
        submitted = launch.flwr_cli(["run", str(app), "rpe", "--run-config", str(cfg)], flwr_home, timeout=180)
        result["operator_run_submitted"] = bool(submitted.get("success")), submitted.get("error-message", "")[-300:]
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        result["serverapp"] = json.loads(out.read_text()) if out.exists() else None
        result["account"] = state["account"]
    finally:
        try:
            launch.down(work)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
