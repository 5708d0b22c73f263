"""The federation in-process (``LocalGrid``: the real ServerApp ``main`` and the real ClientApp
handlers, no network): the ``evaluate`` mode with its tables and plots, and the server's handling of
a site that answers with more than it may. The same on a real Flower deployment:
``tests/integration/test_federation_deployment.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.federation import LOCAL_RELEASE, PRIVATE_POLICY, SITES, check_private_release, make_site_data, privacy_of
from support.grid import LocalGrid, enrol_keys, flower_task_identity, run_server_app, site_context

from common.protocol import wire
from common.trust.signing import generate_keypair
from deploy import launch, tls
from server.allowlist import AllowList

REPO = Path(__file__).resolve().parents[2]


# -- helpers ----------------------------------------------------------------------------------
# -- in-process: the real ServerApp main and ClientApp handlers, no network -------------------
@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """Report sites on the in-process grid (this file's own ``local``: it overrides the two-family
    one of ``support.seg`` here)."""
    import torch

    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("local")
    data = make_site_data(tmp / "data", n=12, n_eval=2)
    nodes = {}
    registry = tmp / "registry"
    allow = AllowList(tmp / "allowlist.json")
    with flower_task_identity():
        for i, (site, path) in enumerate(sorted(data.items()), start=101):
            nc = {
                "site-id": site,
                "data-path": str(path),
                "model-path": str(tiny_model_dir),
                "site-dir": str(tmp / "sites" / site),
                "threads": 1,
                **LOCAL_RELEASE,
            }
            nodes[i] = site_context(i, enrol_keys(tmp, allow, registry, site, nc))
        yield {"tmp": tmp, "nodes": nodes, "registry": registry, "model": tiny_model_dir, "allowlist": allow.path}
    torch.set_num_threads(threads)


def run_local(local: dict, run_id: int, offline: tuple[int, ...] = (), tamper=None, **config) -> tuple[dict, LocalGrid]:
    rc = {
        "registry-dir": str(local["registry"]),
        "base-model": str(local["model"]),
        "chroma": "off",
        "steps": 2,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "max-length": 128,
        "max-eval": 2,
        "allowlist": str(local["allowlist"]),
        **config,
    }
    for ctx in local["nodes"].values():
        # every site pins the key of the coordinator (registry) this test talks to
        ctx.node_config["coordinator-key"] = str(local["registry"] / "coordinator.pub")
    return run_server_app(local["nodes"], run_id, rc, offline, tamper)


@pytest.mark.slow
def test_local_evaluate_writes_leave_one_site_out_tables_and_plots(local, capsys):
    report, _ = run_local(local, 11, mode="enroll")
    assert {s: r["status"] for s, r in report["enroll"].items()} == dict.fromkeys(SITES, "accepted")
    report, grid = run_local(local, 12, mode="evaluate", k=2, **{"eval-strategies": "sim,lin"})
    assert report["status"] == "completed", report.get("error")
    ev = report["evaluate"]
    methods = {(r["target"], r["method"]) for r in ev["rows"]}
    for site in SITES:
        for method in ("base", "sim", "lin", "nearest", "avg", "own"):
            assert (site, method) in methods, (site, method, ev["problems"])
    for row in ev["rows"]:
        if row["method"] not in ("base", "own"):
            assert row["target"] not in row["sources"]  # leave-one-site-out
    out = {k: Path(v) for k, v in ev["outputs"].items()}
    assert {"csv", "markdown", "weights_plot", "distance_plot", "score_plot"} <= set(out)
    assert all(p.exists() and p.stat().st_size > 0 for p in out.values())
    assert "| **mean** |" in out["markdown"].read_text()
    applies = [m for m in grid.sent if m.metadata.message_type == wire.APPLY]
    assert all(not m.content["config"]["store"] for m in applies)  # evaluation arms are not stored at sites
    # one train.evaluate message per target carries every arm (the site loads its model once)
    evaluates = [m for m in grid.sent if m.metadata.message_type == wire.EVALUATE]
    assert not applies and len(evaluates) == len(SITES)
    n_arms = sum(len(json.loads(m.content["config"]["arms"])) for m in evaluates)
    # progress: one line per (target, arm) as each result arrives, each with the time left
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[rpe] evaluate [")]
    assert len(lines) == n_arms
    assert lines[-1].startswith(f"[rpe] evaluate [{n_arms}/{n_arms}]")
    assert all("target " in x and ", arm " in x and "left" in x for x in lines)
    assert any("ROUGE-L" in x for x in lines)
    run_log = (local["registry"] / "runs" / "12-evaluate.log").read_text().splitlines()  # what deploy/demo.py relays
    assert [x for x in run_log if x.startswith("[rpe] evaluate [")] == lines


def test_local_compose_rejects_nothing_and_delivers(local):
    if not (local["registry"] / "registry.json").exists():
        run_local(local, 21, mode="enroll")
    report, grid = run_local(local, 22, offline=(103,), mode="compose", target="a,c", strategy="lin", k=2)
    assert report["compose"]["a"]["status"] == "delivered"
    assert sorted(report["compose"]["a"]["sites"]) == ["b", "c"]
    assert report["compose"]["c"]["status"] == "failed" and "offline" in report["compose"]["c"]["reason"]
    # one hash names the composed adapter: the composition entry, the delivery, the site's receipt and egress
    sha = report["compose"]["a"]["blob_sha256"]
    assert report["compose"]["a"]["output_sha256"] == sha
    audit = [json.loads(x) for x in (local["registry"] / "audit.jsonl").read_text().splitlines()]
    mine = [e for e in audit if e.get("target") == "a" and e["event"] in ("composition", "composition.delivered")]
    assert [e["output_sha256"] for e in mine][-2:] == [sha, sha]
    egress = [json.loads(x) for x in (local["tmp"] / "sites" / "a" / "egress.jsonl").read_text().splitlines()]
    assert egress[-1]["extra"]["blob_sha256"] == sha
    apply_cfg = next(m for m in grid.sent if m.metadata.message_type == wire.APPLY).content["config"]
    assert apply_cfg["blob_sha256"] == sha


def test_local_enroll_rejects_a_reply_with_extra_records(local, monkeypatch):
    from flwr.app import ConfigRecord

    import client.app as client_app

    original = client_app._enroll

    def leaky(req, site, context):
        content = original(req, site, context)
        content["raw_reports"] = ConfigRecord({"text": "Findings: ..."})
        return content

    monkeypatch.setitem(client_app.HANDLERS, wire.ENROLL, leaky)
    before = (local["registry"] / "records.jsonl").read_text() if (local["registry"] / "records.jsonl").exists() else ""
    report, _ = run_local(local, 31, mode="enroll", sites="b", seed=7)
    res = report["enroll"]["b"]
    assert res["status"] == "error" and "refused" in res["reason"] and "raw_reports" in res["reason"]
    assert res["kind"] == "refused" and res["code"] == wire.ERROR_REFUSED  # typed, not only a string
    after = (local["registry"] / "records.jsonl").read_text()
    assert after == before


def test_local_enroll_logs_one_audit_entry_per_submission_that_cross_checks(local):
    """Each enrolment reply leaves exactly one submission entry (the registry's, with the app's run
    id, nonce and record digests on it), and the sites' egress logs cross-check against it."""
    from server.crosscheck import cross_check

    if not (local["registry"] / "registry.json").exists():
        run_local(local, 33, mode="enroll")
    report, _ = run_local(local, 34, mode="enroll", sites="a,b", seed=5)
    assert {s: r["status"] for s, r in report["enroll"].items()} == {"a": "accepted", "b": "accepted"}
    audit_path = local["registry"] / "audit.jsonl"
    entries = [json.loads(x) for x in audit_path.read_text().splitlines()]
    # (each run also audits the identity each site proved at discovery: identity.verified, and the
    # adapters a new one supersedes: record.superseded)
    mine = [e for e in entries if e.get("run_id") == "34" and e["event"].startswith("submission.")]
    assert sorted((e["event"], e["site"]) for e in mine) == [("submission.accepted", "a"), ("submission.accepted", "b")]
    for e in mine:
        assert e["record_id"] == report["enroll"][e["site"]]["record_id"] and e["nonce"]
        assert set(e["record_digests"]) == {"adapter", "embedding", "meta"}
    assert not any(e["event"] == "enroll.received" for e in entries)
    for site in ("a", "b"):
        rep = cross_check(local["tmp"] / "sites" / site / "egress.jsonl", audit_path, site, ("train",))
        assert rep.ok, str(rep)
        assert any(m["run_id"] == "34" and m["matched_on"] == "record_digests" for m in rep.matched)


# -- settings and progress (fast) -------------------------------------------------------------
def test_settings_defaults_are_the_pyproject_run_config():
    """One place for defaults: every [tool.flwr.app.config] key is a Settings field with that default."""
    import tomllib

    from server.settings import SITE_ONLY_KEYS, Settings

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {k: v for k, v in table.items() if k not in SITE_ONLY_KEYS} == Settings.defaults()
    s = Settings.from_run_config({**table, "registry-dir": "/r"}, env={})
    assert s == Settings(registry_dir="/r", allowlist="/r/allowlist.json")
    parsed = Settings.from_run_config({"registry-dir": "/r", "sites": "a, b", "k": 5, "mode": "compose"}, env={})
    assert parsed.sites == ("a", "b") and parsed.k == 5 and parsed.strategy_params("sim") == {}
    from server.settings import SettingsError

    with pytest.raises(SettingsError, match="mode='train'"):
        Settings.from_run_config({"registry-dir": "/r", "mode": "train"}, env={})
    with pytest.raises(SettingsError, match="no registry"):
        Settings.from_run_config({}, env={})


def test_progress_says_what_arrived_and_how_long_is_left():
    from server.reporting import Progress

    now = [0.0]
    lines: list[str] = []
    p = Progress("evaluate", 4, heartbeat_s=30.0, clock=lambda: now[0], emit=lines.append)
    now[0] = 10.0
    p.waiting()  # quiet for less than the heartbeat: nothing
    now[0] = 40.0
    p.waiting()
    assert lines == ["evaluate: waiting for the sites, 0/4 results in (40 s elapsed, estimating time left)"]
    now[0] = 60.0
    p.result("target a, arm sim", "ROUGE-L 0.2000")
    assert lines[-1] == "evaluate [1/4] target a, arm sim: ROUGE-L 0.2000 (60 s elapsed, about 3.0 min left)"
    assert p.eta() == 180.0


def test_a_site_failure_is_typed(monkeypatch):
    from flwr.app import Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.messaging import Reply, SiteFailure

    for name in ("_run_id", "_node_id", "_task_id"):  # Flower messages need a task identity
        monkeypatch.setattr(TaskIdentity, name, 1)

    assert Reply("a", None, "n").failure == SiteFailure("timeout", "no reply in time (site offline or too slow)")
    msg = Message(RecordDict(), dst_node_id=1, message_type=wire.WHOAMI)
    err = Message(Error(code=wire.ERROR_FAILED, reason="OSError: disk"), reply_to=msg)
    failure = Reply("a", err, "n").failure
    assert (failure.kind, failure.code) == ("failed", wire.ERROR_FAILED)
    assert str(failure) == f"failed (code {wire.ERROR_FAILED}): OSError: disk"


def test_demo_relays_the_run_log_while_a_run_is_in_flight(tmp_path, capsys):
    from deploy.demo import relay_progress

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "1-enroll.log").write_text("[rpe] an earlier run\n")
    with relay_progress(runs, poll_s=0.05):
        (runs / "2-evaluate.log").write_text("[rpe] evaluate [1/4] target a, arm sim: ROUGE-L 0.2 (1 s)\n[rpe] half")
        time.sleep(0.5)
    err = capsys.readouterr().err
    assert "[demo]   evaluate [1/4] target a, arm sim: ROUGE-L 0.2 (1 s)" in err
    assert "earlier run" not in err and "half" not in err  # only new, whole lines


def test_demo_fails_loudly_when_an_evaluation_did_not_complete() -> None:
    """The main job once printed empty tables and exited 0 after its ServerApp died under load:
    a family whose evaluation run failed or produced nothing, or any reported problem, is a failure."""
    from deploy.demo import _evaluation, failures

    ok = {"outputs": {"markdown": "/x/results.md"}, "problems": {}, "run_status": "finished:completed"}
    assert failures({"families": {"report": ok}}) == []
    died = _evaluation(
        {"status": "finished:failed", "details": "No heartbeat received from the task", "report": {"status": "running"}}
    )
    got = failures({"families": {"report": {**ok, **died, "outputs": {}}}})
    assert got == ["report: the evaluation run ended 'finished:failed' (No heartbeat received from the task)"]
    offline = {**ok, "problems": {"BMC": "offline"}}
    assert failures({"families": {"segmentation": offline}}) == ["segmentation: BMC: offline"]
    empty = {**ok, "outputs": {}}
    assert failures({"families": {"report": empty}}) == ["report: the evaluation produced no results"]
    assert failures({"families": {"report": {**ok, "rows": 0}}}) == ["report: the evaluation produced no results"]
    enrol = {
        "report": {
            "run_status": "finished:completed",
            "report_status": "running",
            "sites": {"xray": "accepted", "ct-head": "no reply"},
        }
    }
    assert failures({"families": {}, "enrolments": enrol}) == [
        "report: the enrolment run ended 'finished:completed' (the ServerApp stopped before it finished)",
        "report: site ct-head was not enrolled (no reply)",
    ]


def test_a_site_runs_only_the_task_families_it_declares(tmp_path):
    from client.site import Site, SiteError, site_task

    site = Site("a", tmp_path, "unused-model", tmp_path / "site-a")
    assert site_task(site, "report-text").name == "report-text"
    with pytest.raises(SiteError, match="unknown task 'segmentation'"):
        site_task(site, "segmentation")
    with pytest.raises(SiteError, match="unknown task 'report-text'"):
        site_task(Site("a", tmp_path, "m", tmp_path, tasks=()), "report-text")


# -- deploy helpers (fast) --------------------------------------------------------------------
def test_tls_material_chains_to_the_ca_and_auth_keys_are_p384_openssh(tmp_path):
    import stat

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from deploy import tls

    bundle = tls.generate(tmp_path, ["a", "b"], ["coord.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coord.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for site, keys in bundle.sites.items():
        priv = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
        pub = load_ssh_public_key(keys.public_key.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        assert pub.public_numbers() == priv.public_key().public_numbers()
        assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600, site
    again = tls.generate(tmp_path, ["a", "b"])  # re-running keeps CA and site keys
    assert again.ca_cert.read_bytes() == bundle.ca_cert.read_bytes()
    assert again.sites["a"].private_key.read_bytes() == bundle.sites["a"].private_key.read_bytes()
    with pytest.raises(tls.TlsError):
        tls.check_site_id("../etc")


def test_local_coordinator_rejects_a_tampered_reply_and_keeps_the_registry(local):
    from flwr.app import ConfigRecord

    if not (local["registry"] / "registry.json").exists():
        run_local(local, 41, mode="enroll")

    def tamper(reply):
        if reply.metadata.message_type == wire.ENROLL and reply.has_content():
            reply.content["raw_reports"] = ConfigRecord({"text": "Findings: ..."})
        return reply

    before = (local["registry"] / "records.jsonl").read_text()
    report, _ = run_local(local, 42, tamper=tamper, mode="enroll", sites="c", seed=11)
    res = report["enroll"]["c"]
    assert res["status"] == "rejected" and "raw_reports" in res["reason"]
    assert (local["registry"] / "records.jsonl").read_text() == before
    audit = [json.loads(x) for x in (local["registry"] / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "submission.rejected" and audit[-1]["site"] == "c"
    assert "raw_reports" in audit[-1]["record_digests"]


def test_app_bundle_stays_under_flowers_limit_and_carries_no_weights():
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files
    from flwr.common.constant import FAB_MAX_SIZE

    from client.pin import app_files

    # the bundle flwr builds from the checkout, without walking its .venv (~5 s of CPU; byte-identical:
    # tests/unit/test_app_bundle_walk.py)
    fab = build_fab_from_files(app_files(REPO))[0]
    names = [i.filename for i in zipfile.ZipFile(io.BytesIO(fab)).infolist()]
    assert len(fab) < FAB_MAX_SIZE, f"app bundle is {len(fab):,} bytes; add fab-include to [tool.flwr.app]"
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".gguf", ".pt", ".npz"))]
    assert {"client/app.py", "server/app.py", "common/protocol/wire.py"} <= set(names)


def test_local_privacy_settings_travel_from_node_config_to_registry_audit_and_egress(local):
    """Site c's node config asks for DP-SGD and the Gaussian mechanism on z: the ε it spent is in the
    registry record, the audit entry and its own egress log; an embedding query reports its own ε."""
    from common.privacy import read_egress, spent_from_egress

    ctx = local["nodes"][103]
    assert ctx.node_config["site-id"] == "c"
    saved = dict(ctx.node_config)
    ctx.node_config.update(PRIVATE_POLICY)
    try:
        report, _ = run_local(local, 45, mode="enroll")
        rid = report["enroll"]["c"]["record_id"]
        check_private_release(*privacy_of(local["registry"], rid))
        run_local(local, 46, mode="compose", target="c", strategy="sim", k=2)
    finally:
        ctx.node_config.clear()
        ctx.node_config.update(saved)
    entries = [json.loads(x) for x in (local["registry"] / "audit.jsonl").read_text().splitlines()]
    query = [e for e in entries if e["event"] == "query.embedding" and e.get("run_id") == "46"]
    assert query and query[0]["privacy"]["z_mechanism"] == "gaussian"
    # the query's set (every report) differs from the enrolment's (training reports) by the 2
    # held-out ones, fewer than z-min-examples: the enrolment's noisy z is re-sent, at no new cost
    # (issue 26 class 2: a fresh z would isolate the held-out set; tests/unit/test_differencing.py)
    assert query[0]["privacy"].get("z_repeat") is True
    from server.auditreport import format_report, report

    text = format_report(report(local["registry"] / "audit.jsonl"))
    assert f"record {rid}; DP-SGD ε=" in text and "z Gaussian ε=4; total ε=" in text
    assert "  c: " in text and "not private" in text  # a and b sent plain z and adapters
    lines = read_egress(local["tmp"] / "sites" / "c" / "egress.jsonl")
    spent = spent_from_egress([x for x in lines if x.get("run_id") in ("45", "46")])
    # the delivered adapter's scores on c's held-out reports are data-derived and not noised: said, not hidden
    assert [r["what"] for r in spent.releases] == ["adapter+z", "z", "metrics"]
    assert spent.epsilon == math.inf and spent.non_private[0].endswith("(metrics on held-out data)")
    noised = spent_from_egress(
        [x for x in lines if x.get("run_id") in ("45", "46") and x["message_type"] != wire.APPLY]
    )
    assert not noised.non_private and math.isfinite(noised.epsilon) and noised.epsilon > 4.0


def test_local_privacy_budget_caps_what_a_site_releases(local, tmp_path):
    """privacy-budget 9 at site c: enrolment (ε 6.6) goes out; the embedding queries get the enrolment's
    noisy z at no cost (their set is 2 reports from it: issue 26 class 2); held-out metrics are withheld; a second enrolment
    (total 10.6) is refused before training, and nothing of it reaches the registry."""
    from common.privacy import read_egress, spent_from_egress

    ctx = local["nodes"][103]
    saved = dict(ctx.node_config)
    ctx.node_config.update({**PRIVATE_POLICY, "privacy-budget": 9.0, "site-dir": str(tmp_path / "site-c")})
    shutil.copytree(Path(saved["site-dir"]) / "keys", tmp_path / "site-c" / "keys")  # the same site, same key
    fresh = {**local, "registry": tmp_path / "registry"}
    try:
        report, _ = run_local(fresh, 61, mode="enroll")
        assert report["enroll"]["c"]["status"] == "accepted"
        first, _ = run_local(fresh, 62, mode="compose", target="c", strategy="sim", k=2)
        again, _ = run_local(fresh, 63, mode="compose", target="c", strategy="sim", k=2)
        refused, _ = run_local(fresh, 64, mode="enroll", sites="c", seed=9)
    finally:
        ctx.node_config.clear()
        ctx.node_config.update(saved)
    for rep in (first, again):
        assert rep["compose"]["c"]["status"] == "delivered" and rep["compose"]["c"]["evaluated"] is False
        assert rep["compose"]["c"]["metrics"] == {}
    entries = [json.loads(x) for x in (fresh["registry"] / "audit.jsonl").read_text().splitlines()]
    queries = [e for e in entries if e["event"] == "query.embedding" and e["site"] == "c"]
    assert [q["run_id"] for q in queries] == ["62", "63"] and queries[0]["z_sha256"] == queries[1]["z_sha256"]
    assert queries[1]["privacy"]["z_repeat"] is True and queries[1]["privacy"]["epsilon_total"] == 0.0
    res = refused["enroll"]["c"]
    assert res["status"] == "error" and "privacy budget exhausted" in res["reason"]
    records = [json.loads(x) for x in (fresh["registry"] / "records.jsonl").read_text().splitlines()]
    assert sum(r["meta"]["site"] == "c" for r in records) == 1
    lines = read_egress(tmp_path / "site-c" / "egress.jsonl")
    assert lines[-1]["message_type"] == wire.ENROLL and lines[-1]["records"] == []
    spent = spent_from_egress(lines)
    # the queries re-send the enrolment's noisy z (their set differs from it by the 2 held-out
    # reports, fewer than z-min-examples: issue 26 class 2), so the site spent the enrolment's ε only
    assert not spent.non_private and 6.0 < spent.epsilon <= 9.0
    assert [r["epsilon"] for r in spent.releases if r["what"] == "z"] == [0.0, 0.0]


def test_local_encrypted_registry_keeps_no_adapter_in_clear_at_the_coordinator(local, tmp_path):
    """Run config blob-key-file: enrolled blobs are AES-GCM ciphertext, and a compose run delivers the
    composed adapter without leaving a clear copy under the registry."""
    from server.registry.blobcrypt import is_encrypted, new_key_file

    key = tmp_path / "blob.key"
    new_key_file(key)
    enc = {**local, "registry": tmp_path / "registry"}
    report, _ = run_local(enc, 51, mode="enroll", **{"blob-key-file": str(key)})
    assert {s: r["status"] for s, r in report["enroll"].items()} == dict.fromkeys(SITES, "accepted")
    blobs = [p for p in (enc["registry"] / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3 and all(is_encrypted(p.read_bytes()) for p in blobs)
    report, _ = run_local(enc, 52, mode="compose", target="a", strategy="sim", k=2, **{"blob-key-file": str(key)})
    assert report["compose"]["a"]["status"] == "delivered"
    assert not (enc["registry"] / "compositions").exists()
    with pytest.raises(ValueError, match="has no key: set run config 'blob-key-file'"):
        run_local(enc, 53, mode="compose", target="a", strategy="sim", k=2)


def test_site_refuses_an_inconsistent_privacy_policy(tmp_path):
    from client.app import SiteError, site_from_context

    ctx = SimpleNamespace(node_config={"site-id": "a", "data-path": str(tmp_path), "z-clip": 3.0}, run_config={})
    with pytest.raises(SiteError, match="protects nothing"):
        site_from_context(ctx)
    ctx.node_config.update({"z-clip": 3.0, "z-epsilon": 2.0, "dp-noise-multiplier": 1.0})
    assert site_from_context(ctx).policy["z-epsilon"] == 2.0
    with pytest.raises(launch.LaunchError, match="KEY=VALUE"):
        launch._privacy_args(["z-epsilon"])
    flags = ["dp-noise-multiplier=1", "b:z-clip=2000", "b:z-epsilon=4"]
    assert launch._privacy_args(flags, "a") == {"dp-noise-multiplier": 1.0}
    assert launch._privacy_args(flags, "b") == {"dp-noise-multiplier": 1.0, "z-clip": 2000.0, "z-epsilon": 4.0}
    with pytest.raises(launch.LaunchError, match="protects nothing"):
        launch._privacy_args(["b:z-clip=2000"], "b")


# -- identity, signed deliveries, the site's release policy (issue 10 items 2 and 3) ------------
def _impostor(local: dict, node: int, site: str, key: bool) -> None:
    """A node whose node config says it is ``site`` (its own site dir; with ``key``, a key of its own
    that is not on the allow-list)."""
    from flwr.app import Context, RecordDict

    real = next(c for c in local["nodes"].values() if c.node_config["site-id"] == site)
    sdir = local["tmp"] / f"impostor-{node}"
    if key and not (sdir / "keys" / f"{site}.key").exists():
        generate_keypair(sdir / "keys", site)
    if not (sdir / "supernode" / f"{site}_auth").exists():  # its own SuperNode key, not the site's
        (sdir / "supernode").mkdir(parents=True, exist_ok=True)
        tls.make_supernode_keys(sdir / "supernode", site)
    nc = {**real.node_config, "site-dir": str(sdir), "supernode-key": str(sdir / "supernode" / f"{site}_auth")}
    local["nodes"][node] = Context(run_id=1, node_id=node, node_config=nc, state=RecordDict(), run_config={})


def test_local_impostor_nodes_are_refused_and_get_nothing_meant_for_the_site(local):
    """Nodes 98 (its own key) and 99 (no key) both say they are site c, and answer before c's node
    103: neither verifies, both are refused and audited, and every message for c goes to node 103."""
    if not (local["registry"] / "registry.json").exists():
        run_local(local, 70, mode="enroll")
    _impostor(local, 98, "c", key=True)
    _impostor(local, 99, "c", key=False)
    try:
        report, grid = run_local(local, 71, mode="compose", target="c", strategy="sim", k=2)
    finally:
        del local["nodes"][98], local["nodes"][99]
    assert report["online"]["c"]["node_id"] == "103" and report["online"]["c"]["verified"] is True
    problems = report["discovery_problems"]
    assert "signed by key" in problems["node 98"] and "without a signed identity statement" in problems["node 99"]
    assert report["compose"]["c"]["status"] == "delivered"
    to_impostors = {m.metadata.message_type for m in grid.sent if m.metadata.dst_node_id in (98, 99)}
    assert to_impostors == {wire.WHOAMI}
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type != wire.WHOAMI} == {103}
    entries = [json.loads(x) for x in (local["registry"] / "audit.jsonl").read_text().splitlines()]
    refused = [e for e in entries if e["event"] == "identity.refused" and e["run_id"] == "71"]
    assert sorted(e["node_id"] for e in refused) == ["98", "99"]
    assert all(e["site"] is None and e["claimed_site"] == "c" for e in refused)  # not under c's name


def test_local_a_copied_signing_key_without_the_sites_supernode_key_is_refused(local):
    """Node 96 holds a copy of site c's Ed25519 signing key (so its identity statement verifies) but
    its own SuperNode key, not the one the coordinator recorded for c: the claim is refused, and
    every message for c goes to c's node 103, which is bound to its recorded SuperNode key. Site b's
    genuine reply with its node signature stripped is refused too."""
    if not (local["registry"] / "registry.json").exists():
        run_local(local, 74, mode="enroll")
    _impostor(local, 96, "c", key=False)
    keys = local["tmp"] / "impostor-96" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    for name in ("c.key", "c.pub"):
        shutil.copy(local["tmp"] / "sites" / "c" / "keys" / name, keys / name)
    os.chmod(keys / "c.key", 0o600)

    def strip(reply):
        if reply.metadata.src_node_id == 102 and reply.has_content() and "whoami" in reply.content:
            statement = json.loads(reply.content["whoami"]["identity"])
            statement.pop("node_signature")
            reply.content["whoami"]["identity"] = wire.canonical_json(statement)
        return reply

    try:
        report, grid = run_local(local, 75, mode="compose", target="c", strategy="sim", k=2, tamper=strip)
    finally:
        del local["nodes"][96]
    problems = report["discovery_problems"]
    assert "does not present the SuperNode key recorded for it" in problems["node 96"], problems
    assert "node signature is missing" in problems["node 102"], problems
    assert report["online"]["c"] == {**report["online"]["c"], "node_id": "103", "verified": True, "node_bound": True}
    assert report["online"]["a"]["node_bound"] is True and "b" not in report["online"]
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type != wire.WHOAMI} <= {101, 103}
    entries = [json.loads(x) for x in (local["registry"] / "audit.jsonl").read_text().splitlines()]
    assert {e["node_id"] for e in entries if e["event"] == "identity.refused" and e["run_id"] == "75"} == {"96", "102"}


def test_local_a_replayed_identity_statement_is_refused(local):
    """Node 97 replays site a's genuine identity statement, taken from a's own egress log of an
    earlier run (another challenge, another run, another node): refused."""
    from common.privacy import read_egress

    if not (local["registry"] / "registry.json").exists():
        run_local(local, 72, mode="enroll")
    lines = read_egress(local["tmp"] / "sites" / "a" / "egress.jsonl")
    captured = next(x for x in reversed(lines) if x["message_type"] == wire.WHOAMI)
    record = next(r for r in captured["records"] if r["name"] == "whoami")
    statement = next(i["value"] for i in record["items"] if i["key"] == "identity")
    assert json.loads(statement)["kind"] == "identity"
    _impostor(local, 97, "a", key=False)

    def replay(reply):
        if reply.metadata.src_node_id == 97 and reply.has_content() and "whoami" in reply.content:
            reply.content["whoami"]["identity"] = statement
        return reply

    try:
        report, grid = run_local(local, 73, mode="whoami", tamper=replay)
    finally:
        del local["nodes"][97]
    assert report["online"]["a"]["node_id"] == "101"
    assert "node 97 claims site 'a'" in report["discovery_problems"]["node 97"]


def test_local_site_refuses_a_delivery_not_signed_by_its_pinned_coordinator(local, tmp_path):
    """Site a pins another coordinator key: the compose reaches it, it refuses to install (typed,
    egress line 'refused'), and no adapter directory appears."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.privacy import read_egress
    from common.trust.signing import public_key_pem

    if not (local["registry"] / "registry.json").exists():
        run_local(local, 74, mode="enroll")
    other = tmp_path / "other.pub"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    ctx = local["nodes"][101]
    rc_pin = str(other)
    # run_local pins every node to the test's registry key; this node config keeps the other key
    saved = dict(ctx.node_config)

    class Pinned(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, rc_pin if key == "coordinator-key" else value)

    ctx.node_config = Pinned(saved)
    try:
        report, _ = run_local(local, 75, mode="compose", target="a", strategy="sim", k=2)
    finally:
        ctx.node_config = saved
    res = report["compose"]["a"]
    assert res["status"] == "undelivered" and res["kind"] == "refused" and "bad-delivery" in res["reason"]
    assert not (local["tmp"] / "sites" / "a" / "adapters" / res["adapter_name"]).exists()
    last = read_egress(local["tmp"] / "sites" / "a" / "egress.jsonl")[-1]
    assert last["message_type"] == wire.APPLY and last["extra"]["outcome"] == "refused" and last["records"] == []


def test_local_site_evaluates_only_arms_its_coordinator_signed(local, tmp_path):
    """``train.evaluate`` is signed like a delivery: a site pinning another key refuses it (typed,
    audited as undelivered with its message type), and a request whose arms differ from the signed
    digest is refused before any model is loaded."""
    import json as _json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from flwr.app import ConfigRecord, Message, RecordDict

    from common.privacy import read_egress
    from common.trust.signing import public_key_pem
    from server.audit import read_entries
    from server.coordkey import load_or_create
    from server.modes.evaluate import evaluate_request
    from server.settings import Settings

    if not (local["registry"] / "registry.json").exists():
        run_local(local, 74, mode="enroll")
    other = tmp_path / "other.pub"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    ctx = local["nodes"][101]
    saved = dict(ctx.node_config)

    class Pinned(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, str(other) if key == "coordinator-key" else value)

    ctx.node_config = Pinned(saved)
    try:
        report, _ = run_local(local, 76, mode="evaluate", target="a", **{"eval-strategies": "sim"})
    finally:
        ctx.node_config = saved
    assert "bad-delivery" in report["evaluate"]["problems"]["a"], report["evaluate"]["problems"]
    last = read_egress(local["tmp"] / "sites" / "a" / "egress.jsonl")[-1]
    assert last["message_type"] == wire.EVALUATE and last["extra"]["outcome"] == "refused" and last["records"] == []
    undelivered = [
        e
        for _, e in read_entries(local["registry"] / "audit.jsonl")
        if e["event"] == "composition.undelivered" and e.get("run_id") == "76"
    ]
    assert undelivered and undelivered[-1]["message_type"] == wire.EVALUATE

    # a genuine signature over two arms, sent with the arms' hashes swapped: refused
    from server.registry import Registry

    with Registry(local["registry"], chroma="off") as reg:
        recs = [r for r in reg.list() if r.meta.site in ("b", "c")][:2]
        batch = [
            ({"arm": f"x{i}", "blob_sha256": wire.adapter_sha256(a)}, a)
            for i, a in enumerate(
                wire.wire_normalized(reg.load_adapter(r.id), base_model=r.meta.base_fingerprint) for r in recs
            )
        ]
        key = load_or_create(reg.path)
    s = Settings.from_run_config({"registry-dir": str(local["registry"])})
    req = evaluate_request(s, "a", 101, batch, "77", key)
    arms = _json.loads(req.content["config"]["arms"])
    arms[0]["blob_sha256"], arms[1]["blob_sha256"] = arms[1]["blob_sha256"], arms[0]["blob_sha256"]
    forged = RecordDict(
        {
            **{k: req.content[k] for k in req.content.keys()},
            "config": ConfigRecord({**dict(req.content["config"]), "arms": wire.canonical_json(arms)}),
        }
    )
    for c in local["nodes"].values():
        c.run_id = 77
    grid = LocalGrid(local["nodes"], 77)
    mid = grid.push_messages([Message(forged, dst_node_id=101, message_type=wire.EVALUATE)])[0]
    rep = grid.pull_messages([mid])[0]
    assert rep.has_error() and "bad-delivery" in rep.error.reason


def _push(local: dict, node: int, mtype: str, config: dict, run_id: int = 80):
    """One request straight to one site's real ClientApp; its reply."""
    from server.messaging import request

    grid = LocalGrid(local["nodes"], run_id)
    for ctx in local["nodes"].values():
        ctx.run_id = run_id
    req = request("x", node, mtype, config)
    from flwr.app import Message

    mid = grid.push_messages([Message(req.content, dst_node_id=node, message_type=mtype)])[0]
    return grid.pull_messages([mid])[0]


def test_local_site_refuses_a_subset_or_layer_0_z_and_sends_nothing(local):
    """The site, not the request, decides what z leaves: a z over 3 of its reports, or from layer 0,
    is refused with a typed code and no records."""
    sub = _push(local, 101, wire.EMBED, {"task": "report-text", "max_examples": 3})
    assert sub.has_error() and sub.error.code == wire.ERROR_REFUSED and "[subset-refused]" in sub.error.reason
    low = _push(local, 101, wire.EMBED, {"task": "report-text", "embed_layer": 0})
    assert low.has_error() and "[layer-not-allowed]" in low.error.reason
    whole = _push(local, 101, wire.EMBED, {"task": "report-text", "embed_layer": -1})
    assert not whole.has_error() and "embedding" in whole.content


def test_local_metrics_over_too_few_reports_stay_at_the_site(local):
    """metrics-min-reports 5 at site a, 2 held-out reports: the adapter is delivered, its scores are not."""
    if not (local["registry"] / "registry.json").exists():
        run_local(local, 76, mode="enroll")
    nc = local["nodes"][101].node_config
    nc["metrics-min-reports"] = 5
    try:
        report, _ = run_local(local, 77, mode="compose", target="a", strategy="sim", k=2)
    finally:
        nc.update(LOCAL_RELEASE)
    res = report["compose"]["a"]
    assert res["status"] == "delivered" and res["metrics"] == {} and res["evaluated"] is False


def test_local_a_failed_egress_write_sends_nothing_and_costs_no_budget(local, tmp_path, monkeypatch):
    """Site c with privacy-budget 6 (one noisy z costs 4): the egress write of the first z reply fails
    (a full disk): the reply carries nothing and the z is not cached as released. The next query
    releases a z (counted) and the one after re-sends it; the budget is never exceeded."""
    from client import egress as egress_mod
    from common.privacy import read_egress, spent_from_egress

    ctx = local["nodes"][103]
    saved = dict(ctx.node_config)
    site_dir = tmp_path / "site-c"
    shutil.copytree(Path(saved["site-dir"]) / "keys", site_dir / "keys")
    ctx.node_config.update({"z-clip": 2.0, "z-epsilon": 4.0, "privacy-budget": 6.0, "site-dir": str(site_dir)})
    real = egress_mod.EgressLog.record
    fail = {"left": 1}

    def full_disk(self, *args, **kwargs):
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(egress_mod.EgressLog, "record", full_disk)
    try:
        first = _push(local, 103, wire.EMBED, {"task": "report-text"}, run_id=81)
        second = _push(local, 103, wire.EMBED, {"task": "report-text"}, run_id=82)
        third = _push(local, 103, wire.EMBED, {"task": "report-text"}, run_id=83)
    finally:
        ctx.node_config.clear()
        ctx.node_config.update(saved)
    assert first.has_error() and not first.has_content() and "egress log" in first.error.reason
    assert not second.has_error() and not third.has_error()
    z2, z3 = (r.content["embedding"]["z"].numpy() for r in (second, third))
    assert (z2 == z3).all()  # the cached z, re-sent
    lines = read_egress(site_dir / "egress.jsonl")
    assert [x["run_id"] for x in lines] == ["82", "83"]  # the failed reply left no line and nothing else
    spent = spent_from_egress(lines)
    assert not spent.non_private and 3.9 < spent.epsilon <= 6.0


def test_local_cross_check_covers_every_message_type_a_site_answered(local, tmp_path):
    """A fresh registry, enrol + compose + evaluate for a: a's egress log (whoami, train,
    query.embed, train.apply, train.evaluate) and the coordinator's audit log match line for line."""
    from server.crosscheck import cross_check

    ctx = local["nodes"][101]
    saved = dict(ctx.node_config)
    site_dir = tmp_path / "site-a"
    shutil.copytree(Path(saved["site-dir"]) / "keys", site_dir / "keys")
    ctx.node_config["site-dir"] = str(site_dir)
    fresh = {**local, "registry": tmp_path / "registry"}
    try:
        run_local(fresh, 91, mode="enroll")
        report, _ = run_local(fresh, 92, mode="compose", target="a", strategy="sim", k=2)
        evaluated, _ = run_local(fresh, 93, mode="evaluate", target="a", **{"eval-strategies": "sim"})
    finally:
        ctx.node_config.clear()
        ctx.node_config.update(saved)
    assert report["compose"]["a"]["status"] == "delivered"
    rep = cross_check(site_dir / "egress.jsonl", fresh["registry"] / "audit.jsonl", "a")
    assert rep.ok, str(rep)
    assert {r["method"] for r in evaluated["evaluate"]["rows"]} >= {"base", "sim", "own"}, evaluated["evaluate"]
    assert sorted(m["message_type"] for m in rep.matched) == sorted(
        [wire.WHOAMI, wire.ENROLL, wire.WHOAMI, wire.EMBED, wire.APPLY, wire.WHOAMI, wire.EMBED, wire.EVALUATE]
    ), str(rep)
    assert all(m["matched_on"] == "record_digests" for m in rep.matched), str(rep)


def test_local_site_trains_in_its_compute_dtype_but_sends_the_float32_z(local):
    """``compute-dtype = bfloat16``: the adapter is trained on bf16 weights and its metadata says so,
    while z is the one the float32 weights give (the same bytes as a float32 site's), so registries
    stay comparable whatever hardware a site has."""
    import numpy as np

    nc = local["nodes"][101].node_config
    replies = {}
    try:
        for dtype in ("float32", "bfloat16"):
            nc["compute-dtype"] = dtype
            rep = _push(
                local,
                101,
                wire.ENROLL,
                {"task": "report-text", "steps": 1, "lora_r": 2, "lora_alpha": 4.0, "max_length": 64},
            )
            assert not rep.has_error(), rep.error.reason if rep.has_error() else ""
            replies[dtype] = rep
    finally:
        nc.pop("compute-dtype", None)
    stats = {d: json.loads(r.content["meta"]["train_stats"]) for d, r in replies.items()}
    assert stats["float32"]["compute_dtype"] == "float32" and stats["bfloat16"]["compute_dtype"] == "bfloat16"
    z = {d: r.content["embedding"]["z"].numpy() for d, r in replies.items()}
    assert np.array_equal(z["float32"], z["bfloat16"])
    a = {d: r.content["adapter"] for d, r in replies.items()}
    assert any(not np.array_equal(a["float32"][k].numpy(), a["bfloat16"][k].numpy()) for k in a["float32"].keys())


def test_site_refuses_an_unknown_compute_dtype(tmp_path):
    from flwr.app import Context, RecordDict

    from client.site import SiteError, site_from_context

    nc = {"site-id": "a", "data-path": str(tmp_path), "compute-dtype": "float16"}
    with pytest.raises(SiteError, match="compute-dtype 'float16' is not one of auto, float32, bfloat16"):
        site_from_context(Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={}))
