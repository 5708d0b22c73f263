"""Enrolment targets and what replies carry (issue 27 item 4), on BOTH task families over the
in-process grid (``support.grid``: the real ServerApp ``main`` and the real ClientApp handlers):

- enrolment with no ``sites=`` asks only the sites whose whoami says they hold labelled data for
  the task; an unlabelled site (a composition target) and a site of the other family are reported
  ``skipped`` with the reason, not as failures, and are never sent a ``train`` request;
- no reply, ok or error, from any handler of either family carries a local filesystem path: the
  sites' data, models and working files live under distinctive folder names, and no reply of an
  enrol-all run, a composition for the unlabelled site, or a direct request of every message type
  (to unlabelled sites, to sites whose data folder is missing, absolute or relative) contains them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from support import LocalGrid
from support.grid import enrol_keys, flower_task_identity, run_server_app, site_context
from support.seg import REPORT_RELEASE, SEG_RELEASE, SEG_SITES, report_config, seg_config

#: in every folder name a site is given here: none of them may appear in anything a site sends
MARKER = "PRIVATE-hospital-7f3a"
#: node ids of the extra sites (the ``local`` fixture holds a, b = 101, 102 and RUNMC, BMC = 201, 202)
U_REPORT, U_SEG, MISSING_REPORT, MISSING_SEG, RELATIVE_REPORT = 103, 203, 104, 204, 105


def _unlabelled_reports(path: Path, n: int = 14) -> None:
    """Reports with findings only (no impression): the site can be a target, never a source."""
    import json

    from common.families.report.data import report_groups

    rows = [{"uid": e.uid, "group": e.group, "prompt": e.prompt} for e in report_groups()["ct-head"][:n]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _unlabelled_volume(folder: Path) -> None:
    """One CT-like NIfTI volume without a label map: 10 unlabelled slices."""
    import nibabel as nib
    import numpy as np

    (folder / "images").mkdir(parents=True)
    vol = (np.random.default_rng(0).random((48, 48, 10)) * 200).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / "images" / "case1.nii.gz"))


@pytest.fixture(scope="module")
def targets(local, tmp_path_factory):
    """``local`` plus an unlabelled site per family, a site per family whose data folder is missing
    and a report site whose data path is relative; every path of theirs holds :data:`MARKER`."""
    from server.allowlist import AllowList

    root = tmp_path_factory.mktemp(MARKER)
    allow = AllowList(local["allowlist"])
    report_nc = {"model-path": str(local["model"]), "threads": 1, **REPORT_RELEASE}
    seg_nc = {"model-path": str(local["sam"]), "threads": 1, "task": "segmentation", **SEG_RELEASE}
    _unlabelled_reports(root / f"{MARKER}-u" / "reports.jsonl")
    _unlabelled_volume(root / f"{MARKER}-v")
    extra = {
        U_REPORT: ("u", {**report_nc, "data-path": str(root / f"{MARKER}-u" / "reports.jsonl")}),
        U_SEG: ("v", {**seg_nc, "seg-dataset": "volumes", "data-path": str(root / f"{MARKER}-v")}),
        MISSING_REPORT: ("m", {**report_nc, "data-path": str(root / f"{MARKER}-gone" / "reports.jsonl")}),
        MISSING_SEG: ("n", {**seg_nc, "seg-dataset": "volumes", "data-path": str(root / f"{MARKER}-gone-vol")}),
        RELATIVE_REPORT: ("r", {**report_nc, "data-path": f"{MARKER}-relative/reports.jsonl"}),
    }
    with flower_task_identity():
        for node, (site, nc) in extra.items():
            nc = {"site-id": site, "site-dir": str(root / "sites" / site), **nc}  # where enrol_keys puts its key
            local["nodes"][node] = site_context(node, enrol_keys(root, allow, local["registry"], site, nc))
    yield {**local, "private": root}
    for node in extra:
        del local["nodes"][node]


def reply_text(msg: Message) -> str:
    """Everything a reply carries, as text: an error's reason, or every record's keys and values."""
    if msg.has_error():
        return msg.error.reason
    parts: list[str] = []
    for name, record in msg.content.items():
        parts.append(name)
        if isinstance(record, (ConfigRecord, MetricRecord)):
            parts += [f"{k}={v!r}" for k, v in record.items()]
        elif isinstance(record, ArrayRecord):
            for k, arr in record.items():
                parts.append(k)
                parts.append(arr.numpy().tobytes().decode("latin-1"))
    return "\n".join(parts)


def local_paths(t: dict) -> list[str]:
    """The local paths no reply may name: the extra sites' folders, the fixture's folders (data,
    site directories, keys) and the base models."""
    return [MARKER, str(t["tmp"]), str(t["model"]), str(t["sam"])]


def assert_no_path(replies: list[Message]) -> None:
    from common.families.segmentation.data import data_root

    for msg in replies:
        text = reply_text(msg)
        for path in [MARKER, str(data_root())]:
            assert path not in text, f"{msg.metadata.message_type} reply carries a local path: {text[:400]}"


def _run(t: dict, run_id: int, rc: dict) -> tuple[dict, list[Message], LocalGrid]:
    """One ServerApp run over every site; (report, every reply a site sent, the grid)."""
    replies: list[Message] = []

    def keep(reply: Message) -> Message:
        replies.append(reply)
        return reply

    report, grid = run_server_app(t["nodes"], run_id, {"allowlist": str(t["allowlist"]), **rc}, tamper=keep)
    for msg in replies:
        text = reply_text(msg)
        for path in local_paths(t):
            assert path not in text, f"{msg.metadata.message_type} reply carries {path}: {text[:400]}"
    return report, replies, grid


@pytest.mark.slow
@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_enrol_all_skips_sites_without_labelled_data_and_no_reply_names_a_path(targets, family):
    from server.run_summary import summarize

    if family == "report-text":
        rc = {k: v for k, v in report_config(targets).items() if k != "sites"}
        labelled, unlabelled, other, run = ["a", "b"], "u", [*SEG_SITES, "v", "n"], 500
        target_node = U_REPORT
    else:
        rc = seg_config(targets["registry"], targets["sam"])
        labelled, unlabelled, other, run = sorted(SEG_SITES), "v", ["a", "b", "u", "m", "r"], 510
        target_node = U_SEG
    report, replies, grid = _run(targets, run, {**rc, "mode": "enroll"})
    status = {s: r["status"] for s, r in report["enroll"].items()}
    assert {s: status.pop(s) for s in labelled} == dict.fromkeys(labelled, "accepted"), report["enroll"]
    assert status.pop(unlabelled) == "skipped"
    assert "no labelled data" in report["enroll"][unlabelled]["reason"]
    for site in other:  # the other family's sites hold another task
        assert status.pop(site) == "skipped" and f"does not hold task {family!r}" in report["enroll"][site]["reason"]
    # the sites whose data folder is missing (same family) are asked, and fail with their cause, path-free
    missing = {"m": MISSING_REPORT, "r": RELATIVE_REPORT} if family == "report-text" else {"n": MISSING_SEG}
    assert status == dict.fromkeys(missing, "error"), status
    for site in missing:
        assert "<local path>" in report["enroll"][site]["reason"], report["enroll"][site]
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert target_node not in trained and trained == {*labelled_nodes(labelled), *missing.values()}
    summary = summarize(report)  # what `rpe fed run` exits by: skipped sites are no failure, broken ones are
    assert summary["outcome"] == "site-failures" and set(summary["problems"]) == set(missing), summary
    assert any(m.metadata.message_type == "train" and not m.has_error() for m in replies)

    # the unlabelled site is what compositions are for: its z and the delivery carry no path either
    report, replies, _ = _run(targets, run + 1, {**rc, "mode": "compose", "target": unlabelled, "k": 2})
    assert report["compose"][unlabelled]["status"] == "delivered", report["compose"][unlabelled]
    assert sorted(report["compose"][unlabelled]["sites"]) == labelled
    assert {m.metadata.message_type for m in replies} >= {"query.whoami", "query.embed", "train.apply"}


def labelled_nodes(sites: list[str]) -> set[int]:
    """The node ids of the ``local`` fixture's labelled sites."""
    return {{"a": 101, "b": 102, SEG_SITES[0]: 201, SEG_SITES[1]: 202}[s] for s in sites}


def _push(t: dict, node: int, req: Any) -> Message:
    """One request (``server.messaging.Request``) straight to one site's real ClientApp; its reply."""
    for ctx in t["nodes"].values():
        ctx.run_id, ctx.run_config = 90, {}
    grid = LocalGrid(t["nodes"], 90)
    mid = grid.push_messages([Message(req.content, dst_node_id=node, message_type=req.message_type)])[0]
    return grid.pull_messages([mid])[0]


def _requests(t: dict, family: str, site: str, node: int) -> dict[str, Any]:
    """A real request of every message type for ``site``, as the coordinator builds them (the
    delivery and the evaluation carry a stored adapter, signed with the coordinator's key)."""
    from common.protocol import wire
    from server.coordkey import load_or_create
    from server.messaging import request
    from server.modes.compose import apply_request
    from server.modes.enroll import train_config
    from server.modes.evaluate import evaluate_request
    from server.registry import Registry
    from server.settings import Settings

    s = Settings(registry_dir="/r", task=family, steps=1, lora_r=2, lora_alpha=4.0)
    reg_dir = t["registry"] / ("segmentation" if family == "segmentation" else "")
    with Registry(reg_dir, chroma="off") as reg:
        rec = reg.list()[0]
        adapter = wire.wire_normalized(reg.load_adapter(rec.id), base_model=rec.meta.base_fingerprint)
    sha = wire.adapter_sha256(adapter)
    key = load_or_create(t["registry"])
    summary = {"ids": [rec.id], "weights": [1.0]}
    return {
        wire.WHOAMI: request(site, node, wire.WHOAMI, {"challenge": "c" * 64}),
        wire.ENROLL: request(site, node, wire.ENROLL, train_config(s)),
        wire.EMBED: request(site, node, wire.EMBED, {"task": family}),
        wire.APPLY: apply_request(
            s, site, node, adapter, sha, f"probe-{site}", "sim", summary, True, target=site, run_id="90", coord_key=key
        ),
        wire.EVALUATE: evaluate_request(s, site, node, [({"arm": "sim", "blob_sha256": sha}, adapter)], "90", key),
    }


@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_replies_of_every_handler_carry_no_local_path(targets, family, monkeypatch):
    """Every message type to sites that cannot do all of it (no labels, no data folder, a relative
    data path): ok replies name no path, and error replies name the problem with ``<local path>``
    where the path was (they named it before)."""
    from common.protocol import wire

    rc = report_config(targets) if family == "report-text" else seg_config(targets["registry"], targets["sam"])
    labelled = "a,b" if family == "report-text" else ",".join(SEG_SITES)
    run_server_app(
        targets["nodes"], 520, {"allowlist": str(targets["allowlist"]), **rc, "mode": "enroll", "sites": labelled}
    )
    monkeypatch.chdir(targets["private"])  # the relative data path lies under the marker folder
    if family == "report-text":
        sites = {U_REPORT: "u", MISSING_REPORT: "m", RELATIVE_REPORT: "r"}
    else:
        sites = {U_SEG: "v", MISSING_SEG: "n"}
    replies = {
        (site, mtype): _push(targets, node, req)
        for node, site in sites.items()
        for mtype, req in _requests(targets, family, site, node).items()
    }
    assert_no_path(list(replies.values()))
    errors = {k: r.error.reason for k, r in replies.items() if r.has_error()}
    for site in sites.values():
        assert (site, wire.WHOAMI) not in errors and (site, wire.ENROLL) in errors, errors
    missing = "m" if family == "report-text" else "n"
    for mtype in (wire.ENROLL, wire.EMBED, wire.APPLY, wire.EVALUATE):  # each read the missing data folder
        assert "<local path>" in errors[(missing, mtype)], errors
    if family == "report-text":
        assert "no labeled training examples in <local path>" in errors[("u", wire.ENROLL)]
        assert "<local path>" in errors[("r", wire.EMBED)]
    else:
        assert ("v", wire.EMBED) not in errors  # the unlabelled volume site sends its z
    # the sites' egress logs record the same scrubbed text
    egress = list((targets["private"] / "sites").glob("*/egress*"))
    assert egress
    for f in egress:
        assert MARKER not in f.read_text(), f


def test_scrub_paths_keeps_the_message_and_drops_every_path():
    from client.release import scrub_paths

    cases = {
        "FileNotFoundError: [Errno 2] No such file or directory: '/srv/h x/data/reports.jsonl'": (
            "FileNotFoundError: [Errno 2] No such file or directory: '<local path>'"
        ),
        "site 'u' has no labeled training examples in /srv/hospital/data": (
            "site 'u' has no labeled training examples in <local path>"
        ),
        "cannot read ~/exports/r.csv: bad row 3": "cannot read <local path>: bad row 3",
        'base model "C:\\models\\llm" is missing': 'base model "<local path>" is missing',
        # not paths: a slash inside a word, a fraction, a URL
        "lora_targets q_proj/v_proj at 1/3, see https://example.org/x": (
            "lora_targets q_proj/v_proj at 1/3, see https://example.org/x"
        ),
    }
    for text, want in cases.items():
        assert scrub_paths(text) == want


def test_a_run_whose_every_site_was_skipped_did_nothing():
    """Skipped is no failure, but an enrolment that skipped every site did nothing: `rpe fed run`
    exits 1 (``nothing-done``), not 0."""
    from server.run_summary import summarize

    skipped = {"status": "skipped", "reason": "no labelled data"}
    report = {"run_id": "1", "mode": "enroll", "status": "completed", "enroll": {"u": skipped, "v": skipped}}
    assert summarize(report)["outcome"] == "nothing-done"
    report["enroll"]["a"] = {"status": "accepted", "record_id": "a:t:0"}
    assert summarize(report)["outcome"] == "ok"
