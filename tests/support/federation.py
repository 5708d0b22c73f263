"""Report-site federation helpers shared by the in-process and the real-deployment federation
tests (``tests/unit/test_federation.py``, ``tests/integration/test_federation_deployment.py``):
the sites and their data, the privacy policy site b runs with, and the checks of a private release.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: a site's privacy policy in node config: DP-SGD for the adapter, the Gaussian mechanism on z
PRIVATE_POLICY = {"dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0, "z-clip": 2.0, "z-epsilon": 4.0}
SITES = {"a": "ct-head", "b": "mr-head", "c": "ct-abdomen"}
#: the tiny test sites hold 2 held-out reports: their node config allows metrics over that few
#: (the safe default, client/policy.py, is 10); z still needs the whole set of >= 10 examples
LOCAL_RELEASE = {"metrics-min-reports": 1}


def make_site_data(root: Path, n: int = 14, n_eval: int = 2) -> dict[str, Path]:
    from common.families.report.data import report_groups, split, write_jsonl

    groups = report_groups()
    out = {}
    for site, group in SITES.items():
        train, held = split(groups[group][:n], n_eval, seed=0)
        write_jsonl(root / site / "train.jsonl", train)
        write_jsonl(root / site / "eval.jsonl", held)
        out[site] = root / site
    return out


def privacy_of(registry: Path, record_id: str) -> tuple[dict, dict]:
    """(the registry record's privacy metadata, the audit log's submission.accepted entry) of a record."""
    records = [json.loads(x) for x in (registry / "records.jsonl").read_text().splitlines()]
    record = next(r for r in records if r.get("id") == record_id)
    entries = [json.loads(x) for x in (registry / "audit.jsonl").read_text().splitlines()]
    accepted = [e for e in entries if e["event"] == "submission.accepted" and e.get("record_id") == record_id]
    assert accepted, f"no submission.accepted audit entry for {record_id}"
    return record["meta"]["privacy"], accepted[-1]


def check_private_release(privacy: dict, audit_entry: dict) -> None:
    """DP-SGD and the z mechanism are both on, with the settings the site's node config asked for."""
    assert privacy["dp_sgd"] is True and privacy["noise_multiplier"] == 1.0 and privacy["steps"] > 0
    assert privacy["z_mechanism"] == "gaussian" and privacy["z_clip"] == 2.0
    assert privacy["z_epsilon"] == pytest.approx(4.0, rel=1e-6)
    assert privacy["epsilon_total"] > max(privacy["epsilon"], privacy["z_epsilon"])
    assert audit_entry["privacy"] == privacy
