"""Re-enrolment (issue 27 item 4), on BOTH task families over the in-process grid
(``support.grid``: the real ServerApp ``main`` and the real ClientApp handlers):

- a site's new adapter for the same task and base supersedes its previous one: the old record stays
  in records.jsonl, the audit log (``record.superseded`` naming old and new ids) and the blob store,
  and is no longer retrievable; the next composition retrieves one adapter per site (it used
  ``['a', 'a', 'a']`` and pushed site b out);
- ``keep-previous=true`` keeps both (recorded in the audit), and retrieval still takes one adapter
  per site unless ``one-per-site=false`` asks for adapters whoever holds them;
- ``base-model=`` that contradicts the existing registry fails the run, naming both bases, with
  nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import make_tiny_llama, make_tiny_sam
from support.seg import SEG_SITES, report_config, run_local, seg_config

FAMILIES = ("report-text", "segmentation")


def _setup(local: dict, family: str) -> tuple[dict, Path, str, str]:
    """(base run config, the family's registry directory, the re-enrolling site, the other site)."""
    if family == "report-text":
        return report_config(local), local["registry"], "a", "b"
    return seg_config(local["registry"], local["sam"]), local["registry"] / "segmentation", SEG_SITES[0], SEG_SITES[1]


def _audit(reg_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (reg_dir / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_reenrolment_supersedes_and_compose_retrieves_one_adapter_per_site(local, family):
    from server.registry import Registry

    rc, reg_dir, x, y = _setup(local, family)
    run = 300 if family == "report-text" else 400
    first = run_local(local, run + 1, {**rc, "mode": "enroll", "sites": f"{x},{y}"})
    assert {s: r["status"] for s, r in first["enroll"].items()} == {x: "accepted", y: "accepted"}, first["enroll"]
    old = first["enroll"][x]["record_id"]

    # the same site enrols again (another seed: another adapter): it replaces its previous one
    again = run_local(local, run + 2, {**rc, "mode": "enroll", "sites": x, "seed": 7})
    res = again["enroll"][x]
    assert res["status"] == "accepted" and res["record_id"] != old
    assert res["superseded"] == [old]
    with Registry(reg_dir, chroma="off") as reg:
        assert [r.id for r in reg.list(site=x)] == [res["record_id"]]
        assert old not in reg
        old_blob = first["enroll"][x]["blob_sha256"]
        assert (reg_dir / "blobs" / "sha256" / old_blob[:2] / old_blob).is_file()  # kept for the audit
        assert reg.verify() == []  # the tombstone is bound into the audit chain
    assert old in (reg_dir / "records.jsonl").read_text()
    sup = [e for e in _audit(reg_dir) if e["event"] == "record.superseded" and e["record_id"] == res["record_id"]]
    assert len(sup) == 1 and sup[0]["superseded"] == [old] and sup[0]["run_id"] == str(run + 2)
    assert sup[0]["site"] == x and sup[0]["superseded_blobs"] == [old_blob]
    removed = [e for e in _audit(reg_dir) if e["event"] == "registry.remove" and e["record_id"] == old]
    assert removed and removed[0]["superseded_by"] == res["record_id"]

    # composition for x with its own adapter allowed and k=2: one adapter of x and one of y
    comp = run_local(local, run + 3, {**rc, "mode": "compose", "target": x, "include-own": "true", "k": 2})
    out = comp["compose"][x]
    assert out["status"] == "delivered", out
    assert sorted(out["sites"]) == sorted([x, y]) and out["ids"][out["sites"].index(x)] == res["record_id"]

    # keep-previous: both stay, and the audit says the operator asked for it
    kept = run_local(local, run + 4, {**rc, "mode": "enroll", "sites": x, "seed": 8, "keep-previous": "true"})
    res2 = kept["enroll"][x]
    assert res2["status"] == "accepted" and "superseded" not in res2
    accepted = [e for e in _audit(reg_dir) if e["event"] == "submission.accepted" and e.get("run_id") == str(run + 4)]
    assert [e["keep_previous"] for e in accepted] == [True]
    with Registry(reg_dir, chroma="off") as reg:
        assert sorted(r.id for r in reg.list(site=x)) == sorted([res["record_id"], res2["record_id"]])
    # retrieval still takes one adapter per site ...
    comp = run_local(local, run + 5, {**rc, "mode": "compose", "target": x, "include-own": "true", "k": 2})
    assert sorted(comp["compose"][x]["sites"]) == sorted([x, y]), comp["compose"][x]
    # ... unless asked otherwise: x's two adapters (the same z) are its two nearest
    many = {**rc, "mode": "compose", "target": x, "include-own": "true", "k": 2, "one-per-site": "false"}
    comp = run_local(local, run + 6, many)
    assert comp["compose"][x]["sites"] == [x, x], comp["compose"][x]
    composition = [e for e in _audit(reg_dir) if e["event"] == "composition"][-1]
    assert composition["one_per_site"] is False

    # a later enrolment without keep-previous supersedes every earlier one of the site
    last = run_local(local, run + 7, {**rc, "mode": "enroll", "sites": x, "seed": 9})
    assert sorted(last["enroll"][x]["superseded"]) == sorted([res["record_id"], res2["record_id"]])
    with Registry(reg_dir, chroma="off") as reg:
        assert [r.id for r in reg.list(site=x)] == [last["enroll"][x]["record_id"]]
        assert len(reg.list(site=y)) == 1
        assert reg.verify() == []


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_that_contradicts_the_registry_fails_the_run_and_writes_nothing(local, family, tmp_path):
    from server.registry import Registry

    rc, reg_dir, x, y = _setup(local, family)
    run = 310 if family == "report-text" else 410
    if not (reg_dir / "registry.json").is_file():
        run_local(local, run, {**rc, "mode": "enroll", "sites": f"{x},{y}"})
    with Registry(reg_dir, chroma="off") as reg:
        (held,) = reg.bases
    if family == "report-text":
        from common.models import fingerprint

        other = make_tiny_llama(tmp_path / "other-llama", seed=1)
        other_fp = fingerprint(other)
    else:
        from common.families.segmentation import sam

        other = make_tiny_sam(tmp_path / "other-sam", seed=1)
        other_fp = sam.fingerprint(other)
    assert other_fp != held
    files = ("records.jsonl", "audit.jsonl", "registry.json", "z.f32")
    before = {f: (reg_dir / f).read_bytes() for f in files}
    with pytest.raises(ValueError, match="base-model") as info:
        run_local(local, run + 1, {**rc, "mode": "enroll", "sites": f"{x},{y}", "base-model": str(other)})
    message = str(info.value)
    assert held in message and other_fp in message, message
    assert {f: (reg_dir / f).read_bytes() for f in files} == before  # nothing written
    report = json.loads((local["registry"] / "runs" / f"{run + 1}-enroll.json").read_text())
    assert report["status"] == "failed" and held in report["error"] and "online" not in report  # no site asked
    # the registry's own base (or none) is fine
    ok = run_local(local, run + 2, {**rc, "mode": "enroll", "sites": x})
    assert ok["enroll"][x]["status"] == "accepted"
