"""The federation end to end on a real Flower deployment: one SuperLink and four SuperNodes on
127.0.0.1, with TLS and SuperNode authentication, running this repository's ServerApp and ClientApp.
Sites a, b, c hold small real report datasets; site d's node config points at a corrupt dataset. The
module runs ``enroll`` once, then ``compose`` for site a, then checks egress logs, a probe that asks
the sites for things outside the vocabulary, and a compose while site c is offline. Every process is
started by ``deploy.launch`` and stopped by PID in the fixture's ``finally``. (In-process, on the
grid: ``tests/unit/test_federation.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from support.federation import LOCAL_RELEASE, PRIVATE_POLICY, SITES, check_private_release, make_site_data, privacy_of

from common.protocol import wire
from deploy import launch

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 240.0


# -- helpers ---------------------------------------------------------------------------------
def _env(flwr_home: Path) -> dict[str, str]:
    return launch.process_env(flwr_home)


def flwr_run(fed: dict, app: Path, config: dict, timeout: float = RUN_TIMEOUT) -> dict:
    """Submit a run and wait for it (``deploy.launch.run_app``); the submission itself must succeed."""
    return launch.run_app(fed["flwr_home"], app, config, fed["registry"], timeout)


def base_config(fed: dict, **over) -> dict:
    cfg = {
        "registry-dir": str(fed["registry"]),
        "base-model": str(fed["model"]),
        "chroma": "off",
        "steps": 3,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "batch-size": 4,
        "max-length": 128,
        "require-signatures": True,
        "timeout-train": 150.0,
        "timeout-query": 60.0,
        "max-eval": 2,
    }
    cfg.update(over)
    return cfg


def live_pids(state: dict) -> list[int]:
    procs = [state["superlink"], *state["sites"].values()] if state.get("superlink") else []
    return [p["pid"] for p in procs if launch.is_alive(p["pid"], p["start_time"])]


# -- the deployment ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    tmp = tmp_path_factory.mktemp("federation")
    data = make_site_data(tmp / "data")
    specs = [
        launch.SiteSpec(
            site,
            str(path),
            str(tiny_model_dir),
            threads=1,
            release=dict(LOCAL_RELEASE),
            privacy=PRIVATE_POLICY if site == "b" else {},
        )
        for site, path in data.items()
    ]
    corrupt = tmp / "data" / "d.jsonl"
    corrupt.write_text('{"prompt": "Findings: normal.", "target": "Normal.", "group": "ct-head"}\n{"prompt": \n')
    specs.append(launch.SiteSpec("d", str(corrupt), str(tiny_model_dir), threads=1))
    workdir = tmp / "deploy"
    registry = tmp / "registry"
    t0 = time.monotonic()
    state: dict = {}
    try:
        state = launch.up(workdir, specs, port=launch.free_port(), timeout=90.0, registry=str(registry))
        print(f"deployment up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield {
            "tmp": tmp,
            "workdir": workdir,
            "registry": registry,
            "model": tiny_model_dir,
            "flwr_home": Path(state["flwr_home"]),
            "state": state,
            "site_dirs": {s.site: Path(s.site_dir) for s in specs},
        }
    finally:
        launch.down(workdir, timeout=15.0)
        state = launch.load_state(workdir)
        leftover = live_pids(state)
        assert not leftover, f"processes still running after down: {leftover}"


@pytest.fixture(scope="module")
def enrolled(fed):
    t0 = time.monotonic()
    run = flwr_run(fed, REPO, base_config(fed, mode="enroll"))
    print(f"enroll run {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return run


@pytest.fixture(scope="module")
def composed(fed, enrolled):
    t0 = time.monotonic()
    run = flwr_run(fed, REPO, base_config(fed, mode="compose", target="a", strategy="sim", k=2))
    print(f"compose run {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return run


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_deployment_uses_tls_and_supernode_auth(fed):
    cmd = " ".join(fed["state"]["superlink"]["cmd"])
    assert "--enable-supernode-auth" in cmd and "--ssl-certfile" in cmd and "--insecure" not in cmd
    assert "127.0.0.1" in fed["state"]["superlink"]["address"]
    for proc in fed["state"]["sites"].values():
        assert "--auth-supernode-private-key" in proc["cmd"] and "--root-certificates" in proc["cmd"]
    status = launch.status(fed["workdir"])
    assert sorted(n["site"] for n in status["nodes"].values()) == ["a", "b", "c", "d"]


@pytest.mark.slow
@pytest.mark.integration
def test_enroll_stores_three_adapters_and_reports_the_failing_site(fed, enrolled):
    from server.registry import Registry

    assert enrolled["status"] == "finished:completed", enrolled
    results = enrolled["report"]["enroll"]
    assert {s: r["status"] for s, r in results.items()} == {
        "a": "accepted",
        "b": "accepted",
        "c": "accepted",
        "d": "error",
    }
    assert "DatasetFormatError" in results["d"]["reason"]
    assert all(results[s]["signed"] for s in SITES)
    reg = Registry(fed["registry"], read_only=True)
    try:
        records = reg.list()
        assert sorted(r.meta.site for r in records) == ["a", "b", "c"]
    finally:
        reg.close()
    assert '"site":"d"' not in (fed["registry"] / "records.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_real_sites_prove_their_identity_and_install_only_a_signed_delivery(fed, composed):
    """On real SuperNodes: every site answered whoami with a statement its allow-listed key signed
    (bound to its node), and site a installed the composed adapter after checking the coordinator's
    delivery signature against the coordinator.pub its node config pins."""
    from common.privacy import read_egress

    assert composed["status"] == "finished:completed", composed
    online = composed["report"]["online"]
    assert all(online[s]["verified"] for s in SITES) and online["a"]["node_id"] != online["b"]["node_id"]
    # each site id is bound to the SuperNode key registered for it (the coordinator's own record)
    assert all(online[s]["node_bound"] for s in SITES), online
    assert sorted(json.loads((fed["workdir"] / "supernode-keys.json").read_text())) == sorted([*SITES, "d"])
    assert (fed["registry"] / "coordinator.pub").exists()
    assert oct((fed["registry"] / "coordinator.key").stat().st_mode & 0o777) == "0o600"
    state_nc = fed["state"]["sites"]["a"]["node_config"]
    assert state_nc["coordinator-key"] == str((fed["registry"] / "coordinator.pub").resolve())
    res = composed["report"]["compose"]["a"]
    assert res["status"] == "delivered"
    applied = [x for x in read_egress(fed["site_dirs"]["a"] / "egress.jsonl") if x["message_type"] == wire.APPLY]
    assert applied and applied[-1]["extra"]["outcome"] == "ok"


@pytest.mark.slow
@pytest.mark.integration
def test_privacy_policy_in_a_supernodes_node_config_reaches_registry_and_audit(fed, enrolled):
    """Site b's SuperNode was started with PRIVATE_POLICY in its node config; sites a and c with none."""
    results = enrolled["report"]["enroll"]
    check_private_release(*privacy_of(fed["registry"], results["b"]["record_id"]))
    for site in ("a", "c"):
        privacy, entry = privacy_of(fed["registry"], results[site]["record_id"])
        assert privacy == {"dp_sgd": False} and entry["privacy"] == privacy


@pytest.mark.slow
@pytest.mark.integration
def test_compose_delivers_an_adapter_stock_peft_loads(fed, composed):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert composed["status"] == "finished:completed", composed
    res = composed["report"]["compose"]["a"]
    assert res["status"] == "delivered", res
    assert "a" not in res["sites"] and len(res["sites"]) == 2
    assert abs(sum(res["weights"]) - 1.0) < 1e-6
    assert res["evaluated"] and 0.0 <= res["metrics"]["rouge_l"] <= 1.0 and res["metrics"]["n"] == 2
    adapter_dir = fed["site_dirs"]["a"] / "adapters" / res["adapter_name"]
    base = AutoModelForCausalLM.from_pretrained(str(fed["model"]))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
@pytest.mark.integration
def test_every_reply_a_site_sent_holds_only_allowed_records(fed, composed):
    seen_types = set()
    for site in SITES:
        lines = [json.loads(x) for x in (fed["site_dirs"][site] / "egress.jsonl").read_text().splitlines()]
        assert lines, f"site {site} logged nothing"
        for line in lines:
            mtype = line["message_type"]
            seen_types.add(mtype)
            records = {r["name"]: r for r in line["records"]}
            if line["extra"]["outcome"] != "ok":
                assert records == {}, line
                continue
            assert mtype in wire.ALLOWED_REPLY_KEYS
            assert set(records) == set(wire.ALLOWED_REPLY_KEYS[mtype]), line
            if mtype == wire.ENROLL:
                meta = {item["key"]: item.get("value") for item in records["meta"]["items"]}
                assert set(meta) == set(wire.ENROLL_META_KEYS)
                lora = wire.parse_lora_config(meta["lora_config"])
                # one packed vector: exactly the factors the LoRA config lays out, nothing more
                expected = {wire.PACKED_KEY: [sum(r * c for _, (r, c) in wire.factor_layout(lora))]}
                got = {i["key"]: i["shape"] for i in records["adapter"]["items"]}
                assert got == expected
                assert all(i["dtype"] == "float32" for i in records["adapter"]["items"])
            if mtype in (wire.ENROLL, wire.EMBED):
                items = records["embedding"]["items"]
                assert len(items) == 1 and items[0]["key"] == "z" and len(items[0]["shape"]) == 1
            if mtype == wire.APPLY:
                assert records["metrics"]["kind"] == "metrics"
    assert {wire.WHOAMI, wire.ENROLL} <= seen_types
    assert wire.EMBED in seen_types and wire.APPLY in seen_types


@pytest.mark.slow
@pytest.mark.integration
def test_site_egress_logs_cross_check_with_the_coordinator_audit_log(fed, composed):
    from server.crosscheck import cross_check

    for site in [*SITES, "d"]:
        rep = cross_check(fed["site_dirs"][site] / "egress.jsonl", fed["registry"] / "audit.jsonl", site, ("train",))
        assert rep.ok, str(rep)
        assert len(rep.matched) == 1, str(rep)
        # and every message type a site answered (whoami, train, query.embed, train.apply)
        full = cross_check(fed["site_dirs"][site] / "egress.jsonl", fed["registry"] / "audit.jsonl", site)
        assert not full.coordinator_only, str(full)
        assert {m["message_type"] for m in full.matched} >= {wire.WHOAMI, wire.ENROLL}, str(full)


PROBE_SERVER = '''
"""Test-only ServerApp: asks every site for things outside the vocabulary."""
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
PROBES = [
    ("query.raw_data", {"config": ConfigRecord({"nonce": "p1"})}),
    ("train", {"config": ConfigRecord({"nonce": "p2", "task": "report-text", "send": "raw data"})}),
    ("query.embed", {"config": ConfigRecord({"nonce": "p3"}), "include": ConfigRecord({"examples": True})}),
]


@app.main()
def main(grid: Grid, context: Context) -> None:
    msgs = [Message(RecordDict(c), dst_node_id=node, message_type=t)
            for node in grid.get_node_ids() for t, c in PROBES]
    out = []
    for reply in grid.send_and_receive(msgs, timeout=120):
        out.append({"node": reply.metadata.src_node_id, "type": reply.metadata.message_type,
                    "error": reply.has_error(), "code": reply.error.code if reply.has_error() else None,
                    "records": [] if reply.has_error() else list(reply.content.keys())})
    Path(str(context.run_config["out"])).write_text(json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.integration
def test_sites_refuse_requests_outside_the_vocabulary(fed, composed):
    app = fed["tmp"] / "probeapp"
    for pkg in ("common", "client"):
        shutil.copytree(REPO / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "probe_server.py").write_text(PROBE_SERVER)
    pyproject = (REPO / "pyproject.toml").read_text()
    pyproject = pyproject.replace('serverapp = "server.app:app"', 'serverapp = "probe_server:app"')
    pyproject = pyproject.replace("\n[tool.flwr.app.config]\n", '\n[tool.flwr.app.config]\nout = ""\n', 1)
    pyproject = pyproject.replace(
        'packages = ["common", "server", "client", "deploy"]', 'packages = ["common", "client"]'
    )
    # the bundle holds only what fab-include names: the probe server instead of server/
    assert '"server/**/*.py"' in pyproject
    pyproject = pyproject.replace('"server/**/*.py"', '"probe_server.py"')
    (app / "pyproject.toml").write_text(pyproject)
    out = fed["tmp"] / "probe.json"
    before = {s: (fed["site_dirs"][s] / "egress.jsonl").read_text().count("\n") for s in SITES}
    run = flwr_run(fed, app, {"mode": "whoami", "out": str(out)}, timeout=150)
    assert run["status"] == "finished:completed"
    replies = json.loads(out.read_text())
    assert len(replies) == 3 * 4
    assert all(r["error"] and r["code"] == wire.ERROR_REFUSED and r["records"] == [] for r in replies), replies
    for site in SITES:
        lines = (fed["site_dirs"][site] / "egress.jsonl").read_text().splitlines()[before[site] :]
        assert len(lines) == 3
        for line in map(json.loads, lines):
            assert line["extra"]["outcome"] == "refused" and line["records"] == []


@pytest.mark.slow
@pytest.mark.integration
def test_offline_site_does_not_stop_compose_and_its_adapter_still_takes_part(fed, composed):
    """Site c is down, and so is the SuperLink's SuperExec (flwr 1.41 loses it to one HTTP 500 under
    load; ``launch.run_app`` restarts it with the SuperLink's environment): the run still completes.
    Site a's SuperNode died unasked (flwr 1.41 SuperNodes exit on one HTTP 500 too): run_app starts
    it again, while c, stopped on purpose, stays down."""
    import signal

    assert launch.stop_site(fed["workdir"], "c") in ("stopped", "killed")
    dead_a = launch.load_state(fed["workdir"])["sites"]["a"]
    os.kill(dead_a["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while launch.is_alive(dead_a["pid"], dead_a["start_time"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    link = launch.load_state(fed["workdir"])["superlink"]
    execs = [
        pid
        for pid, _ in launch.descendants(link["pid"])
        if any(a.endswith("flower-superexec") for a in launch._cmdline(pid))
    ]
    assert execs, "no SuperExec under the SuperLink"
    for pid in execs:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while launch._live_superexec(link["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not launch._live_superexec(link["pid"])
    run = flwr_run(fed, REPO, base_config(fed, mode="compose", target="b,c", strategy="avg", k=2))
    assert run["status"] == "finished:completed", run
    assert launch._live_superexec(link["pid"])  # restarted by run_app
    sites = launch.load_state(fed["workdir"])["sites"]
    assert sites["a"]["pid"] != dead_a["pid"] and launch.is_alive(sites["a"]["pid"], sites["a"]["start_time"])
    assert sites["c"].get("stopped") and not launch.is_alive(sites["c"]["pid"], sites["c"]["start_time"])
    res = run["report"]["compose"]
    assert "c" not in run["report"]["online"]
    assert res["b"]["status"] == "delivered", res["b"]
    assert sorted(res["b"]["sites"]) == ["a", "c"]  # c's stored adapter takes part although c is offline
    assert res["c"]["status"] == "failed" and "offline" in res["c"]["reason"]
    assert (fed["site_dirs"]["b"] / "adapters" / res["b"]["adapter_name"] / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_down_stops_every_process(fed):
    state = launch.load_state(fed["workdir"])
    family = [pid for p in [state["superlink"], *state["sites"].values()] for pid, _ in launch.descendants(p["pid"])]
    launch.down(fed["workdir"], timeout=15.0)
    assert live_pids(state) == []
    assert [pid for pid in family if launch.proc_start_time(pid) is not None] == []
    if sys.platform.startswith("linux"):
        assert not any(
            os.path.exists(f"/proc/{p['pid']}") and launch.proc_start_time(p["pid"]) == p["start_time"]
            for p in [state["superlink"], *state["sites"].values()]
        )


@pytest.mark.integration
def test_stop_process_terminates_the_process_and_its_children(tmp_path):
    script = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "time.sleep(60)"
    )
    proc = launch._spawn([sys.executable, "-c", script], tmp_path / "p.log", dict(os.environ), tmp_path)
    deadline = time.monotonic() + 10
    while not launch.descendants(proc["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = launch.descendants(proc["pid"])
    assert children
    assert launch.stop_process(proc["pid"], proc["start_time"], timeout=5) == "stopped"
    assert not launch.is_alive(proc["pid"], proc["start_time"])
    assert all(not launch.is_alive(pid, start) for pid, start in children)
    assert launch.stop_process(proc["pid"], proc["start_time"]) == "not running"
