"""Segmentation sites in the federation, beside report sites, with the same message vocabulary.

1. In-process (``LocalGrid``: the real ServerApp ``main`` and the real ClientApp handlers): two
   report sites (tiny Llama) and two prostate sites (tiny random SAM, real slices) enrol into one
   registry directory; a segmentation evaluate and a report query never see each other's
   adapters (each representation has its own registry, each base its own fingerprint filter).
2. On a real Flower deployment: ``tests/integration/test_seg_federation_deployment.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import LocalGrid
from support.seg import SEG_SITES, run_local, seg_config

from common.families.segmentation import sam


@pytest.mark.slow
def test_local_both_families_enrol_into_one_registry_dir_and_never_mix(local):
    from server.registry import Registry

    reg_dir = local["registry"]
    report_rc = {
        "registry-dir": str(reg_dir),
        "base-model": str(local["model"]),
        "chroma": "off",
        "steps": 2,
        "lora-r": 4,
        "lora-alpha": 8.0,
        "max-length": 128,
        "max-eval": 2,
        "sites": "a,b",
    }
    report = run_local(local, 21, {**report_rc, "mode": "enroll"})
    assert {s: r["status"] for s, r in report["enroll"].items()} == {"a": "accepted", "b": "accepted"}
    # a report site asked for segmentation refuses; a segmentation site asked for reports refuses
    report = run_local(local, 22, seg_config(reg_dir, local["sam"], mode="enroll", sites="a,RUNMC,BMC"))
    status = {s: r["status"] for s, r in report["enroll"].items()}
    assert status == {"a": "error", "RUNMC": "accepted", "BMC": "accepted"}, report["enroll"]
    assert "unknown task 'segmentation'" in report["enroll"]["a"]["reason"]

    with Registry(reg_dir, chroma="off") as reports, Registry(reg_dir / "segmentation", chroma="off") as segs:
        assert sorted(r.meta.site for r in reports.list()) == ["a", "b"]
        assert sorted(r.meta.site for r in segs.list()) == sorted(SEG_SITES)
        assert segs.representation == "sam-encoder-mean" and segs.embedding_dim == 32  # tiny SAM: 32 channels
        assert reports.embedding_dim != segs.embedding_dim
        assert {r.meta.base_fingerprint for r in segs.list()} == {sam.fingerprint(local["sam"])}
        assert not {r.meta.base_fingerprint for r in reports.list()} & {r.meta.base_fingerprint for r in segs.list()}
        assert all(r.meta.extra["embedding_spec"]["representation"] == "sam-encoder-mean" for r in segs.list())

    report = run_local(local, 23, seg_config(reg_dir, local["sam"], mode="evaluate", k=1, **{"eval-strategies": "sim"}))
    assert report["status"] == "completed", report.get("error")
    rows = report["evaluate"]["rows"]
    assert {r["target"] for r in rows} == set(SEG_SITES), report["evaluate"]["problems"]
    methods = {r["method"] for r in rows if r["target"] == "RUNMC"}
    assert methods == {"base", "sim", "nearest", "avg", "own"}
    for r in rows:
        assert r["metric"] == "dice" and 0.0 <= r["score"] <= 1.0
        assert set(r["sources"]) <= set(SEG_SITES)  # never a report adapter
        if r["method"] not in ("own", "base"):
            assert r["target"] not in r["sources"]
    md = Path(report["evaluate"]["outputs"]["markdown"]).read_text()
    assert "(DICE)" in md and "## Weights per target" in md


def _push(local: dict, node: int, mtype: str, config: dict, run_id: int = 80):
    """One request straight to one site's real ClientApp; its reply."""
    from flwr.app import Message

    from server.messaging import request

    for ctx in local["nodes"].values():
        ctx.run_id, ctx.run_config = run_id, {}
    grid = LocalGrid(local["nodes"], run_id)
    req = request("x", node, mtype, config)
    mid = grid.push_messages([Message(req.content, dst_node_id=node, message_type=mtype)])[0]
    return grid.pull_messages([mid])[0]


def test_local_a_segmentation_site_keeps_its_release_policy_and_proves_its_identity(local):
    """The report family's trust rules hold for segmentation sites: z only over all of its slices
    and only the encoder's output, and an identity statement signed with both keys (deliveries go
    through the same signature check in ``client/handlers.apply``, used by the evaluate above)."""
    from common.protocol import wire

    sub = _push(local, 201, wire.EMBED, {"task": "segmentation", "max_examples": 2})
    assert sub.has_error() and sub.error.code == wire.ERROR_REFUSED and "[subset-refused]" in sub.error.reason
    low = _push(local, 201, wire.EMBED, {"task": "segmentation", "embed_layer": 0})
    assert low.has_error() and "[layer-not-allowed]" in low.error.reason
    whole = _push(local, 201, wire.EMBED, {"task": "segmentation"})
    assert not whole.has_error() and "embedding" in whole.content
    who = _push(local, 201, wire.WHOAMI, {"challenge": "c" * 64})
    info = wire.parse_whoami_reply(who.content)
    assert info["n_labeled"] == 3 and info["n_examples"] >= 5
    statement = json.loads(info["identity"])
    assert statement["body"]["site"] == "RUNMC" and statement["body"]["supernode_key"]
    assert statement["node_signature"]
