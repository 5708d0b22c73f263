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


@pytest.mark.slow
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


# -- the registry itself (fast: random adapters, no sites) ------------------------------------------
def _nearest_sites(Z, sites, q, k):
    """Brute force: each site's nearest row (ties: earlier row), the k nearest sites."""
    import numpy as np

    d = ((Z.astype(np.float64) - q.astype(np.float32).astype(np.float64)) ** 2).sum(1)
    best: dict[str, int] = {}
    for row in np.lexsort((np.arange(len(d)), d)):
        best.setdefault(sites[row], int(row))
    return sorted(best.values(), key=lambda r: (d[r], r))[:k]


@pytest.mark.parametrize("method", ["auto", "brute", "index"])
def test_one_per_site_query_is_the_nearest_site_by_its_nearest_record(tmp_path, method):
    import numpy as np
    from support.registry import DIM, make_adapter, make_meta, new_registry

    from common.adapters import adapter_to_bytes
    from server.registry import NotEnoughRecordsError

    rng = np.random.default_rng(3)
    Z = rng.standard_normal((300, DIM)).astype(np.float32)
    blobs = [adapter_to_bytes(make_adapter(i)) for i in range(20)]
    with new_registry(tmp_path / "reg") as reg:
        recs = reg.add_many([(blobs[i % 20], Z[i], make_meta(i, task="ct-head")) for i in range(300)])
        sites = [r.meta.site for r in recs]
        for trial in range(8):
            q = Z[trial * 31] + 0.01 * rng.standard_normal(DIM).astype(np.float32) if trial % 2 else Z[trial]
            for k in (1, 3, 5):
                hits = reg.query(q, k, method=method, one_per_site=True)
                assert [h.record.id for h in hits] == [recs[r].id for r in _nearest_sites(Z, sites, q, k)]
                assert len({h.record.meta.site for h in hits}) == k
            # without it, the nearest records, several of one site
            assert len({h.record.meta.site for h in reg.query(q, 25, method=method)}) < 25
        with pytest.raises(NotEnoughRecordsError, match=r"only 4 site\(s\) hold a matching record"):
            reg.query(Z[0], 5, exclude_site="a", one_per_site=True)


def test_supersede_is_bound_audited_and_survives_reopen(tmp_path):
    import numpy as np
    from support.registry import DIM, audit_lines, make_adapter, make_meta, new_registry

    from server.audit import verify as verify_audit
    from server.registry import Registry

    root = tmp_path / "reg"
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4, DIM)).astype(np.float32)
    with new_registry(root) as reg:
        a1 = reg.add(make_adapter(1), z[0], make_meta(0, site="a", task="ct-head"))
        b1 = reg.add(make_adapter(2), z[1], make_meta(1, site="b", task="ct-head"))
        other_task = reg.add(make_adapter(3), z[2], make_meta(2, site="a", task="mr-head"))
        a2 = reg.add(make_adapter(4), z[3], make_meta(3, site="a", task="ct-head"))
        assert [r.id for r in reg.supersede(a2.id, run_id="9")] == [a1.id]  # same site, task and base only
        n_audit = len(audit_lines(root))
        assert reg.supersede(a2.id, run_id="9") == [] and len(audit_lines(root)) == n_audit  # nothing to do
        assert sorted(r.id for r in reg.list()) == sorted([b1.id, other_task.id, a2.id])
        hits = reg.query(z[0], 2, task="ct-head")
        assert [h.record.id for h in hits] == [a2.id, b1.id] or [h.record.id for h in hits] == [b1.id, a2.id]
        assert reg.verify(full=True) == []
    entry = [e for e in audit_lines(root) if e["event"] == "record.superseded"]
    assert len(entry) == 1 and entry[0]["record_id"] == a2.id and entry[0]["superseded"] == [a1.id]
    assert verify_audit(root / "audit.jsonl") == []
    for read_only in (False, True):  # reopened (from the snapshot, then read-only): the same registry
        with Registry(root, read_only=read_only, chroma="off") as reg:
            assert a1.id not in reg and a2.id in reg and len(reg) == 3
            assert reg.verify() == []
    with Registry(root) as reg:
        assert reg.stats()["removed"] == 1 and reg.index_ready


def test_rpe_compose_takes_one_adapter_per_site_unless_asked(tmp_path, capsys):
    import numpy as np
    from support.registry import DIM, make_adapter, make_meta, new_registry

    from deploy.cli import main

    rng = np.random.default_rng(9)
    za = rng.standard_normal(DIM).astype(np.float32)
    with new_registry(tmp_path / "reg") as reg:  # site a kept two adapters (same z), b one further away
        a1 = reg.add(make_adapter(1), za, make_meta(0, site="a", task="ct-head"))
        a2 = reg.add(make_adapter(2), za, make_meta(1, site="a", task="ct-head"))
        b1 = reg.add(make_adapter(3), za + 1.0, make_meta(2, site="b", task="ct-head"))
    np.save(tmp_path / "z.npy", za)
    base = ["compose", "--registry", str(tmp_path / "reg"), "--embedding", str(tmp_path / "z.npy"), "--k", "2"]
    main([*base, "--out", str(tmp_path / "one"), "--json"])
    retrieved = [r["id"] for r in json.loads(capsys.readouterr().out)["retrieved"]]
    assert retrieved == [a1.id, b1.id]
    main([*base, "--out", str(tmp_path / "several"), "--json", "--several-per-site"])
    retrieved = [r["id"] for r in json.loads(capsys.readouterr().out)["retrieved"]]
    assert retrieved == [a1.id, a2.id]
