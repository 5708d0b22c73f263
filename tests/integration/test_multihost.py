"""The hardened multi-machine deployment of deploy/README.md, in Linux network namespaces.

Hosts (tests/support/netns.py): ``coord`` runs ``python -m deploy.launch superlink`` (SuperLink on
127.0.0.1 behind nginx on 0.0.0.0:9093, TLS, SuperNode auth, Fleet API only for the two site
networks, Control API only through the operator socket or for an operator certificate); ``site-a`` / ``site-b`` run
``python -m deploy.launch supernode`` with the app bundle pinned (``--app-sha256``); ``outsider``
has only the public ``ca.crt``. Every process is started tied to this test process
(PR_SET_PDEATHSIG, own process group), stopped by PID, and the namespaces are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import netns

from deploy import launch, tls

REPO = Path(__file__).resolve().parents[2]
SITES = {"a": "ct-head", "b": "mr-head"}
PORT = 9093
DELAY_PORT = 9193
#: how long a run waits for a killed site's training reply (b, which is not killed, needs ~20 s)
KILLED_TRAIN_TIMEOUT = 60.0
RUN_TIMEOUT = 240.0

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")  # noqa: SIM115 - handed to the child, closed with it
    return launch.popen_tied(
        cmd, tie=True, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), cwd=str(REPO)
    )


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} (after {timeout:.0f} s)\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher (``--attach`` then runs ``down``); SIGKILL its group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def make_site_data(root: Path, n: int = 10, n_eval: int = 2) -> dict[str, Path]:
    from common.families.report.data import report_groups, split, write_jsonl

    groups = report_groups()
    out = {}
    for site, group in SITES.items():
        train, held = split(groups[group][:n], n_eval, seed=0)
        write_jsonl(root / site / "train.jsonl", train)
        write_jsonl(root / site / "eval.jsonl", held)
        out[site] = root / site
    return out


def _flwr(topo: netns.Topology, host: str, home: Path, args: list[str], timeout: float = 90) -> dict:
    cmd = [*topo.prefix(host), launch._bin("flwr"), *args, "--format", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=launch.process_env(home), timeout=timeout)
    start = res.stdout.find("{")
    try:
        return json.loads(res.stdout[start:]) if start >= 0 else {"success": False, "raw": res.stderr}
    except json.JSONDecodeError:
        return {"success": False, "raw": res.stdout + res.stderr}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """One topology and one enrolment-ready deployment for the whole module (start-up is the slow
    part). Site b reaches the coordinator through a 200 ms delaying proxy from the start, so every
    run of the module also crosses a slow link."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    from client.pin import fab_sha256

    tmp = tmp_path_factory.mktemp("multihost")
    topo = netns.Topology().create()
    procs: dict[str, subprocess.Popen] = {}
    launchers: dict[str, tuple[list[str], Path]] = {}
    saved_prefix = list(launch.CLI_PREFIX)
    # nginx's workers (not root, never nobody) must reach the operator socket in the coordinator's
    # workdir: pytest's temporary root is mode 0700, so the workdir lives in a directory they can enter
    open_base = Path(tempfile.mkdtemp(prefix="rpe-mh-", dir="/tmp"))
    open_base.chmod(0o755)
    try:
        coord, registry = open_base / "coord", tmp / "registry"
        coord.mkdir()
        op_ca, op_key = tls.make_operator_ca(tmp / "operator")
        operator = tls.make_operator_cert(tmp / "operator", "alice", op_ca, op_key)
        link_log = tmp / "coord-launch.log"
        cmd = [
            *topo.prefix("coord"),
            sys.executable,
            "-m",
            "deploy.launch",
            "superlink",
            "--attach",
            "--workdir",
            str(coord),
            "--host",
            "0.0.0.0",
            "--port",
            str(PORT),
            "--registry",
            str(registry),
            "--operator-ca",
            str(op_ca),
        ]
        for host in netns.PEERS:
            cmd += ["--tls-host", topo.coord_addr[host]]
        cmd += ["--site-network", topo.nets["site-a"], "--site-network", topo.nets["site-b"]]
        launchers["coord"] = (cmd, link_log)
        t0 = time.monotonic()
        procs["coord"] = _start(cmd, link_log)
        _wait(
            lambda: "SuperLink PID" in (link_log.read_text() if link_log.exists() else ""),
            120,
            "the coordinator did not come up",
            procs["coord"],
            link_log,
        )
        state = launch.load_state(coord)
        launch.CLI_PREFIX[:] = topo.prefix("coord")  # the operator works on the coordinator host
        # the app the sites approve and the operator runs: a snapshot of this checkout, so that edits
        # to the working tree during the module (a developer's, or a parallel session's) do not
        # change the bundle after it was pinned
        app = _snapshot_app(tmp / "app")
        pin = fab_sha256(app)
        data = make_site_data(tmp / "data")
        site_dirs: dict[str, Path] = {}
        keys = {}
        for site in SITES:
            sdir = tmp / f"site-{site}"
            keys[site] = tls.make_supernode_keys(sdir / "certs", site)
            shutil.copy(state["ca_cert"], sdir / "ca.crt")
            site_dirs[site] = sdir
        launch.register_sites(coord, {s: k.public_key for s, k in keys.items()}, record=coord / "allowlist.json")
        from server.allowlist import AllowList

        allow = AllowList(coord / "allowlist.json")
        # site b's link: 200 ms per chunk and direction (tests/support/delay_proxy.py inside site b's host)
        target = f"{topo.coord_addr['site-b']}:{PORT}"
        procs["delay"] = _start(
            [
                *topo.prefix("site-b"),
                sys.executable,
                str(REPO / "tests" / "support" / "delay_proxy.py"),
                "--listen",
                f"127.0.0.1:{DELAY_PORT}",
                "--target",
                target,
                "--delay",
                "0.2",
            ],
            tmp / "delay-proxy.log",
        )
        dial = {"a": f"{topo.coord_addr['site-a']}:{PORT}", "b": f"127.0.0.1:{DELAY_PORT}"}
        for site, sdir in site_dirs.items():
            host = f"site-{site}"
            log = tmp / f"{host}-launch.log"
            launchers[site] = (
                [
                    *topo.prefix(host),
                    sys.executable,
                    "-m",
                    "deploy.launch",
                    "supernode",
                    "--attach",
                    "--workdir",
                    str(sdir),
                    "--superlink",
                    dial[site],
                    "--root-certificates",
                    str(sdir / "ca.crt"),
                    "--auth-key",
                    str(keys[site].private_key),
                    "--site-id",
                    site,
                    "--data-path",
                    str(data[site]),
                    "--model-path",
                    str(tiny_model_dir),
                    "--site-dir",
                    str(sdir / "site"),
                    "--port",
                    "9094",
                    "--threads",
                    "1",
                    "--app-sha256",
                    pin,
                    "--coordinator-key",
                    str(registry / "coordinator.pub"),
                    "--release",
                    "z-min-examples=8",
                    "--release",
                    "metrics-min-reports=1",
                ],
                log,
            )
            procs[site] = _start(*launchers[site])
        for site, sdir in site_dirs.items():
            pub = sdir / "site" / "keys" / f"{site}.pub"
            _wait(pub.exists, 60, f"site {site} did not start", procs[site], launchers[site][1])
            allow.add(site, pub.read_text())
        launch.wait_online(coord, list(SITES), timeout=120)
        print(f"multi-host deployment up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield {
            "topo": topo,
            "coord": coord,
            "registry": registry,
            "model": tiny_model_dir,
            "state": state,
            "flwr_home": Path(state["flwr_home"]),
            "site_dirs": {s: d / "site" for s, d in site_dirs.items()},
            "keys": keys,
            "tmp": tmp,
            "pin": pin,
            "app": app,
            "procs": procs,
            "launchers": launchers,
            "site_workdirs": site_dirs,
            "operator": operator,
            "operator_ca": op_ca,
        }
    finally:
        launch.CLI_PREFIX[:] = saved_prefix
        for proc in reversed(list(procs.values())):
            _stop(proc)
        topo.remove()
        shutil.rmtree(open_base, ignore_errors=True)


def base_config(h: dict, **over) -> dict:
    cfg = {
        "registry-dir": str(h["registry"]),
        "base-model": str(h["model"]),
        "chroma": "off",
        "steps": 2,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "batch-size": 4,
        "max-length": 96,
        "require-signatures": True,
        "timeout-train": 150.0,
        "timeout-query": 60.0,
        "max-eval": 2,
    }
    cfg.update(over)
    return cfg


def _outsider_home(h: dict) -> Path:
    home = h["tmp"] / "outsider-home"
    launch.write_flwr_config(home, "rpe", f"{h['topo'].coord_addr['outsider']}:{PORT}", Path(h["state"]["ca_cert"]))
    return home


def _curl(h: dict, host: str, path: str, cert: tuple[Path, Path] | None = None, protobuf: bool = False) -> int:
    """HTTP status of a POST to the coordinator from ``host`` (0: no answer, e.g. a TLS failure);
    ``protobuf``: an empty protobuf body, a valid request for list-style routes."""
    url = f"https://{h['topo'].coord_addr[host]}:{PORT}{path}"
    extra = ["--cert", str(cert[0]), "--key", str(cert[1])] if cert else []
    if protobuf:
        extra += [
            "-H",
            "Content-Type: application/protobuf",
            "-H",
            "Accept: application/protobuf",
            "--data-binary",
            "@/dev/null",
        ]
    res = subprocess.run(
        [
            *h["topo"].prefix(host),
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            h["state"]["ca_cert"],
            *extra,
            "-X",
            "POST",
            "--path-as-is",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(res.stdout or 0)


# -- the closed control plane ------------------------------------------------------------------
def test_outsider_can_neither_register_nor_run(hosts):
    home = _outsider_home(hosts)
    key = tls.make_supernode_keys(hosts["tmp"] / "outsider-keys", "evil")
    before = launch.supernode_status(hosts["flwr_home"])
    reg = _flwr(hosts["topo"], "outsider", home, ["supernode", "register", str(key.public_key), "rpe"])
    assert not reg.get("success"), reg
    run = _flwr(hosts["topo"], "outsider", home, ["run", str(hosts["app"]), "rpe"], timeout=120)
    assert not run.get("success"), run
    assert not _flwr(hosts["topo"], "outsider", home, ["ls", "rpe"]).get("success")
    assert launch.supernode_status(hosts["flwr_home"]) == before  # nothing registered
    # raw requests: Control and Runtime closed, Fleet closed to a network that is not a site's
    assert _curl(hosts, "outsider", "/v1/control/list-runs") == 403
    assert _curl(hosts, "outsider", "/v1/fleet/pull-messages") == 403
    assert _curl(hosts, "outsider", "/v1/runtime/pull-app-inputs") == 404
    assert _curl(hosts, "outsider", "/docs") == 404


def test_an_operator_client_certificate_opens_the_control_api_from_off_the_host(hosts):
    """``--operator-ca``: from the outsider's host, the Control API answers a request that presents
    a certificate of the operator CA (the SuperLink itself replies: 200 with an empty run list
    request), and no other one: none (403), one of another CA or of the public federation CA (400,
    nginx refuses the handshake's certificate). The certificate opens nothing else."""
    coord_certs = hosts["coord"] / "certs"
    other_ca, other_key = tls.make_ca(hosts["tmp"] / "other-ca")
    foreign = tls.make_operator_cert(hosts["tmp"] / "other-ca", "mallory", other_ca, other_key)
    federation = tls.make_operator_cert(
        hosts["tmp"] / "fed-signed", "eve", coord_certs / tls.CA_CERT, coord_certs / tls.CA_KEY
    )  # what a stolen coordinator CA key could sign
    op = hosts["operator"]
    assert _curl(hosts, "outsider", "/v1/control/list-runs", protobuf=True) == 403
    assert _curl(hosts, "outsider", "/v1/control/list-runs", op, protobuf=True) == 200
    assert _curl(hosts, "outsider", "/v1/control/list-runs", foreign, protobuf=True) in (0, 400, 403)
    assert _curl(hosts, "outsider", "/v1/control/list-runs", federation, protobuf=True) in (0, 400, 403)
    assert _curl(hosts, "outsider", "/v1/fleet/pull-messages", op) == 403  # not a site network
    assert _curl(hosts, "outsider", "/v1/runtime/pull-app-inputs", op) == 404


def test_loopback_of_the_coordinator_is_not_an_operator_credential(hosts):
    """Issue 26, class 3, in this deployment: on the coordinator host itself, without the operator
    certificate, the Control and Runtime APIs answer 403/404 through nginx and 403 on the
    SuperLink's own loopback port, and stock ``flwr`` fails; the operator, through the socket
    (``deploy.flwr_main``), lists the nodes."""
    inner = hosts["state"]["superlink"]["port"]
    assert inner != PORT
    codes = {}
    for port in (PORT, inner):
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/pull-app-inputs"):
            res = subprocess.run(
                [
                    *hosts["topo"].prefix("coord"),
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    hosts["state"]["ca_cert"],
                    "-H",
                    "Content-Type: application/protobuf",
                    "--data-binary",
                    "@/dev/null",
                    "-X",
                    "POST",
                    f"https://127.0.0.1:{port}{path}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            codes[(port, path)] = int(res.stdout or 0)
    assert all(code in (403, 404) for code in codes.values()), codes
    home = hosts["tmp"] / "coord-loopback-home"
    launch.write_flwr_config(home, "rpe", f"127.0.0.1:{PORT}", Path(hosts["state"]["ca_cert"]))
    key = tls.make_supernode_keys(hosts["tmp"] / "coord-loopback-keys", "local")
    before = launch.supernode_status(hosts["flwr_home"])
    assert before  # the operator's own commands work, through the socket
    assert not _flwr(hosts["topo"], "coord", home, ["supernode", "register", str(key.public_key), "rpe"]).get("success")
    assert not _flwr(hosts["topo"], "coord", home, ["ls", "rpe"]).get("success")
    assert launch.supernode_status(hosts["flwr_home"]) == before


def test_a_site_host_reaches_the_fleet_api_but_not_the_control_api(hosts):
    home = hosts["tmp"] / "site-a-home"
    launch.write_flwr_config(
        home, "rpe", f"{hosts['topo'].coord_addr['site-a']}:{PORT}", Path(hosts["state"]["ca_cert"])
    )
    assert not _flwr(hosts["topo"], "site-a", home, ["run", str(hosts["app"]), "rpe"], timeout=120).get("success")
    key = tls.make_supernode_keys(hosts["tmp"] / "site-a-extra", "a2")
    assert not _flwr(hosts["topo"], "site-a", home, ["supernode", "register", str(key.public_key), "rpe"]).get(
        "success"
    )
    assert _curl(hosts, "site-a", "/v1/control/start-run") == 403
    for sneaky in (
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet//pull-messages",
        "/v1/fleet/pull-messages?x=1",
    ):
        assert _curl(hosts, "site-a", sneaky) in (400, 403, 404), sneaky
    # the Fleet API itself answers (an unauthenticated request is refused by the SuperLink, not nginx)
    assert _curl(hosts, "site-a", "/v1/fleet/pull-messages") not in (403, 404)


def test_site_a_cannot_pass_for_site_b_with_an_unregistered_key(hosts):
    """SuperNode authentication: a node from site a's host with a key the coordinator never bound
    to a site name is refused (the site-id claim check itself belongs to the ServerApp)."""
    topo, tmp = hosts["topo"], hosts["tmp"]
    key = tls.make_supernode_keys(tmp / "impostor", "b")
    log = tmp / "impostor.log"
    cmd = [
        *topo.prefix("site-a"),
        launch._bin("flower-supernode"),
        "--superlink",
        f"{topo.coord_addr['site-a']}:{PORT}",
        "--root-certificates",
        hosts["state"]["ca_cert"],
        "--auth-supernode-private-key",
        str(key.private_key),
        "--node-config",
        "site-id='b'",
        "--port",
        "9194",
    ]
    proc = _start(cmd, log)
    try:
        rc = proc.wait(90)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert rc not in (None, 0), log.read_text()[-2000:]
    nodes = launch.supernode_status(hosts["flwr_home"])
    assert sum(1 for st in nodes.values() if st == "online") == 2


# -- the app pin -------------------------------------------------------------------------------
def _egress(h: dict, site: str) -> list[dict]:
    path = h["site_dirs"][site] / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _snapshot_app(app: Path, source: Path = REPO) -> Path:
    """What ``fab-include`` takes from ``source`` (the *.py of common/client/server, pyproject.toml)."""
    for pattern in ("common/**/*.py", "client/**/*.py", "server/**/*.py"):
        for src in source.glob(pattern):
            dst = app / src.relative_to(source)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    shutil.copy(source / "pyproject.toml", app / "pyproject.toml")
    return app


def test_a_modified_app_is_refused_at_pinned_sites_before_any_handler(hosts):
    app = _snapshot_app(hosts["tmp"] / "modified-app", hosts["app"])
    marker = hosts["tmp"] / "handler-ran"
    with open(app / "client" / "app.py", "a") as fh:  # what an attacker ships: any code at all
        fh.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    run = launch.run_app(
        hosts["flwr_home"], app, base_config(hosts, mode="whoami", **{"timeout-query": 30.0}), hosts["registry"], 180
    )
    assert not marker.exists(), "the modified ClientApp was imported at a pinned site"
    for site in SITES:
        lines = [x for x in _egress(hosts, site) if x["run_id"] == str(run["run_id"])]
        assert lines, f"site {site}: no egress line for the refused run"
        assert all(x["extra"]["outcome"] == "refused" and "app-not-approved" in x["extra"]["reason"] for x in lines), (
            lines
        )
        assert lines[0]["extra"]["pinned"] == [hosts["pin"]]
        assert not any(x["message_type"] == "query.whoami" and x["extra"]["outcome"] != "refused" for x in lines)


# -- enrol and compose across hosts ----------------------------------------------------------------
@pytest.fixture(scope="module")
def enrolled(hosts):
    t0 = time.monotonic()
    run = launch.run_app(
        hosts["flwr_home"], hosts["app"], base_config(hosts, mode="enroll"), hosts["registry"], RUN_TIMEOUT
    )
    print(f"multi-host enroll {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return run


def test_enroll_and_compose_across_hosts(hosts, enrolled):
    from server.registry import Registry

    assert enrolled["status"] == "finished:completed", enrolled
    results = enrolled["report"]["enroll"]
    assert {s: r["status"] for s, r in results.items()} == {"a": "accepted", "b": "accepted"}, results
    assert all(results[s]["signed"] for s in SITES)
    # each site id bound to the SuperNode key `register` recorded for it on the coordinator host
    assert all(enrolled["report"]["online"][s]["node_bound"] for s in SITES), enrolled["report"]["online"]
    t0 = time.monotonic()
    composed = launch.run_app(
        hosts["flwr_home"],
        hosts["app"],
        base_config(hosts, mode="compose", target="a", strategy="sim", k=1, evaluate=False),
        hosts["registry"],
        RUN_TIMEOUT,
    )
    print(f"multi-host compose {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert composed["status"] == "finished:completed", composed
    res = composed["report"]["compose"]["a"]
    assert res["status"] == "delivered", res
    assert res["sites"] == ["b"]
    reg = Registry(hosts["registry"], read_only=True)
    try:
        assert sorted(r.meta.site for r in reg.list()) == ["a", "b"]
    finally:
        reg.close()


def test_200ms_latency_on_one_link(hosts, enrolled):
    """Site b reaches the coordinator through a proxy that delays every chunk by 200 ms each way (from
    the module's start): the link is slow, and the enrolment run over it completed with b's whoami
    and enrolment answered."""
    topo = hosts["topo"]
    t0 = time.monotonic()
    res = subprocess.run(
        [
            *topo.prefix("site-b"),
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--retry",
            "5",
            "--retry-connrefused",
            "--resolve",
            f"localhost:{DELAY_PORT}:127.0.0.1",
            "--cacert",
            hosts["state"]["ca_cert"],
            f"https://127.0.0.1:{DELAY_PORT}/health",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.stdout == "200" and time.monotonic() - t0 >= 0.4, (res.stdout, time.monotonic() - t0)
    run = enrolled
    assert run["status"] == "finished:completed", run
    for site in SITES:
        assert any(
            x["run_id"] == str(run["run_id"]) and x["message_type"] == "query.whoami" and x["extra"]["outcome"] == "ok"
            for x in _egress(hosts, site)
        ), site
    assert run["report"]["enroll"]["b"]["status"] == "accepted"


# -- faults ----------------------------------------------------------------------------------------
def _records(registry: Path) -> list[dict]:
    path = registry / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_site_killed_mid_training_and_a_lossy_link(hosts, enrolled):
    """5 % of TCP packets into site b are dropped (nftables in its namespace) and site a's SuperNode
    is SIGKILLed while it trains, then restarted: the run completes, each site's outcome is named,
    and the registry gains exactly one record per accepted site, none twice."""
    import threading

    topo = hosts["topo"]
    topo.drop_percent("site-b", 5)
    before = _records(hosts["registry"])
    log_a = hosts["site_workdirs"]["a"] / "logs" / "supernode-a.log"
    seen = log_a.read_text().count("Receiving: train message")
    out: dict = {}

    def submit() -> None:
        try:
            out["run"] = launch.run_app(
                hosts["flwr_home"],
                hosts["app"],
                base_config(hosts, mode="enroll", **{"timeout-train": KILLED_TRAIN_TIMEOUT}),
                hosts["registry"],
                RUN_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            out["error"] = exc

    worker = threading.Thread(target=submit, daemon=True)
    worker.start()
    try:
        _wait(lambda: log_a.read_text().count("Receiving: train message") > seen, 180, "site a never got training")
        node = launch.load_state(hosts["site_workdirs"]["a"])["sites"]["a"]
        os.killpg(node["pid"], signal.SIGKILL)  # the site host's SuperNode and its ClientApp die
        _stop(hosts["procs"]["a"])
        # The SuperLink refuses to activate a node it still counts online (HTTP 412, ApiError 2004,
        # and the new SuperNode exits): restart only once the dead node missed its heartbeats.
        node_a = launch.load_state(hosts["coord"])["registered"]["a"]
        _wait(
            lambda: time.sleep(3) or launch.supernode_status(hosts["flwr_home"]).get(node_a) != "online",
            180,
            "the SuperLink still counts the killed SuperNode online",
        )
        hosts["procs"]["a"] = _start(*hosts["launchers"]["a"])
        worker.join(RUN_TIMEOUT + 60)
    finally:
        topo.clear_drop("site-b")
    launch.wait_online(hosts["coord"], list(SITES), timeout=120)  # the restarted site is back
    assert "error" not in out, out.get("error")
    run = out["run"]
    assert run["status"] == "finished:completed", run
    results = run["report"]["enroll"]
    assert set(results) | set(run["report"].get("discovery_problems", {})) >= {"b"}
    assert results["b"]["status"] == "accepted", results
    if "a" in results and results["a"]["status"] != "accepted":
        assert results["a"].get("reason"), results["a"]
    from server.registry import Registry

    reg = Registry(hosts["registry"], read_only=True)
    try:
        live = reg.list()
    finally:
        reg.close()
    ids = [r.id for r in live]
    assert len(ids) == len(set(ids)), f"a record is listed twice: {ids}"
    for site, res in results.items():
        if res["status"] == "accepted":
            assert ids.count(res["record_id"]) == 1, (site, res, ids)
    for rec in before:  # nothing earlier lost, unless replaced by the same site's new enrolment
        assert rec["id"] in ids or results.get(rec["meta"]["site"], {}).get("status") == "accepted", rec["id"]
    raw = _records(hosts["registry"])
    assert raw[: len(before)] == before  # the append-only log kept every earlier line


def test_the_superlink_restarted_mid_enrolment(hosts, enrolled):
    """The coordinator's SuperLink (and its proxy) is restarted with the same ``--database`` while
    site a trains: the ServerApp dies with its SuperLink, and the run is reported failed exactly
    (``flwr ls``: ``finished:failed``, "No heartbeat received from the task"; the run report names
    the phase it reached); nothing reaches the registry (records and audit chain unchanged, the chain
    verifies), and the registrations survive: both sites are back online under the same node ids."""
    import threading

    launch.wait_online(hosts["coord"], list(SITES), timeout=120)
    before = _records(hosts["registry"])
    audit = hosts["registry"] / "audit.jsonl"
    audit_before = audit.read_bytes() if audit.exists() else b""
    nodes_before = launch.supernode_status(hosts["flwr_home"])
    log_a = hosts["site_workdirs"]["a"] / "logs" / "supernode-a.log"
    seen = log_a.read_text().count("Receiving: train message")
    out: dict = {}

    def submit() -> None:
        try:
            out["run"] = launch.run_app(
                hosts["flwr_home"], hosts["app"], base_config(hosts, mode="enroll"), hosts["registry"], RUN_TIMEOUT
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            out["error"] = exc

    worker = threading.Thread(target=submit, daemon=True)
    worker.start()
    _wait(lambda: log_a.read_text().count("Receiving: train message") > seen, 180, "site a never got training")
    cmd, log = hosts["launchers"]["coord"]
    starts = log.read_text().count("SuperLink PID")
    _stop(hosts["procs"]["coord"])  # `down`: nginx, the SuperLink and its SuperExec / ServerApp
    hosts["procs"]["coord"] = _start(cmd, log)
    _wait(
        lambda: log.read_text().count("SuperLink PID") > starts,
        120,
        "the SuperLink did not come back",
        hosts["procs"]["coord"],
        log,
    )
    worker.join(RUN_TIMEOUT + 60)
    assert "error" not in out, out.get("error")
    run = out["run"]
    assert run["status"] == "finished:failed", run
    assert "heartbeat" in run["details"].lower(), run["details"]
    accepted = [s for s, r in run["report"].get("enroll", {}).items() if r.get("status") == "accepted"]
    assert run["report"].get("status") != "completed" and not accepted, run["report"]
    assert _records(hosts["registry"]) == before  # nothing lost, nothing half-stored, nothing twice
    after = audit.read_bytes() if audit.exists() else b""
    assert after.startswith(audit_before)  # nothing rewritten; the only new entries are identity checks
    new_events = {json.loads(line)["event"] for line in after[len(audit_before) :].splitlines() if line.strip()}
    assert new_events <= {"identity.verified", "identity.unverified", "identity.refused"}, new_events
    res = subprocess.run(
        [launch._bin("rpe"), "audit", "verify", "--log", str(audit)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    launch.wait_online(hosts["coord"], list(SITES), timeout=120)
    assert launch.supernode_status(hosts["flwr_home"]) == nodes_before  # same node ids, online


# -- without namespaces: the route table and the pin check itself ------------------------------------
def test_the_proxy_forwards_exactly_flwrs_fleet_routes_and_nginx_accepts_the_config(tmp_path):
    from flwr.superlink.routers.fleet.router import router as fleet_router

    from deploy import proxy

    flwr_routes = sorted(r.path.removeprefix(proxy.FLEET_PREFIX) for r in fleet_router.routes)
    assert sorted(proxy.FLEET_ROUTES) == flwr_routes, "flwr's Fleet API changed: review deploy/proxy.py"
    bundle = tls.generate(tmp_path / "certs", [])
    spec = proxy.ProxySpec(
        tmp_path / "proxy",
        "0.0.0.0",
        9093,
        10093,
        bundle.server_cert,
        bundle.server_key,
        bundle.ca_cert,
        ["10.231.1.0/24"],
    )
    text = proxy.render_config(spec)
    assert "location /v1/runtime" not in text and "location = /v1/fleet/pull-messages" in text
    assert "10.231.1.0/24 1;" in text and "default 0;" in text
    with pytest.raises(proxy.ProxyConfigError):
        proxy.check_networks(["10.231.1.0/33"])
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        conf = proxy.write_config(spec)
        res = subprocess.run(
            [
                launch.nginx_binary(),
                "-t",
                "-q",
                "-p",
                str(spec.prefix),
                "-c",
                str(conf),
                "-e",
                str(spec.prefix / "logs" / "error.log"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr


def test_pin_check_refuses_other_code_and_logs_it(tmp_path):
    import hashlib

    from client.pin import AppNotApproved, check_fab

    good, bad = b"reviewed bundle", b"something else"
    pin = hashlib.sha256(good).hexdigest()
    cfg = {"site-dir": str(tmp_path), "app-sha256": pin}
    assert check_fab(good, cfg, 7) == pin
    with pytest.raises(AppNotApproved, match="app-not-approved"):
        check_fab(bad, cfg, 8, "evil/app", "train")
    with pytest.raises(AppNotApproved, match="64 hex digits"):
        check_fab(good, {"site-dir": str(tmp_path), "app-sha256": "abc"}, 9)
    assert check_fab(bad, {"site-dir": str(tmp_path)}, 10)  # no pin: the site chose to run anything
    lines = [json.loads(x) for x in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert [(x["run_id"], x["message_type"], x["extra"]["outcome"]) for x in lines] == [
        ("8", "train", "refused"),
        ("9", "unknown", "refused"),
    ]
    assert lines[0]["extra"]["fab_sha256"] == hashlib.sha256(bad).hexdigest() and lines[0]["extra"]["pinned"] == [pin]


def test_operator_certificates_are_client_certificates_of_their_own_ca(tmp_path):
    """``deploy.tls --operator``: a client certificate (EKU clientAuth) from a CA separate from the
    federation CA, accepted by a standard TLS server that requires client certificates of that CA
    (what nginx's ``--operator-ca`` check does) and refused by one that trusts only the federation CA."""
    import socket
    import ssl
    import threading

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    assert tls.main(["--out", str(tmp_path / "op"), "--operator", "alice"]) == 0
    cert, key = tmp_path / "op" / "operator-alice.crt", tmp_path / "op" / "operator-alice.key"
    op_ca = tmp_path / "op" / tls.OPERATOR_CA_CERT
    for private in (key, tmp_path / "op" / tls.OPERATOR_CA_KEY):
        assert private.stat().st_mode & 0o777 == 0o600, private
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert list(parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    parsed.verify_directly_issued_by(x509.load_pem_x509_certificate(op_ca.read_bytes()))
    fed = tls.generate(tmp_path / "fed", [])

    def handshake(trusted: Path) -> bool:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(fed.server_cert, fed.server_key)
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(trusted)
        client = ssl.create_default_context(cafile=str(fed.ca_cert))
        client.load_cert_chain(cert, key)
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            result: dict = {}

            def serve() -> None:
                conn, _ = lsock.accept()
                try:
                    with server.wrap_socket(conn, server_side=True) as tconn:
                        result["peer"] = tconn.getpeercert()
                        tconn.sendall(b"ok")
                except (ssl.SSLError, OSError) as exc:
                    result["error"] = exc

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            try:
                with socket.create_connection(lsock.getsockname(), timeout=10) as sock:
                    with client.wrap_socket(sock, server_hostname="localhost") as tsock:
                        tsock.recv(2)
            except (ssl.SSLError, OSError):
                pass
            thread.join(10)
        return "peer" in result

    assert handshake(op_ca)
    assert not handshake(fed.ca_cert)  # the public federation CA does not vouch for operators
