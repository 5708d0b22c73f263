"""Every auditor's tool sees every family: ``rpe audit verify / report / cross-check`` pointed at the
coordinator's registry root cover the root's registry and each family registry under it.

A yes/no tool is tested on the clean case (must say yes) and on each kind of damage (must say no and
name it); here the damage is in the segmentation family's registry, and ``verify`` is run on the root.
Also: a family registry holds no symlink (the coordinator key is a copy), so one copied on its own opens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from support.two_family import SEG_DIR, accepted_line, build, lines, put, tamper_line

from common.trust.signing import load_public_key
from common.trust.statements import verify_statement
from deploy.cli import main
from server import audit as audit_mod
from server.coordroot import audit_sources, family_registries
from server.crosscheck import cross_check
from server.registry import Registry


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build(tmp_path_factory.mktemp("two-family"))


@pytest.fixture
def built(pristine, tmp_path):
    """A private copy of the two-family tree for a test that damages it."""
    src = pristine["root"].parent
    dst = tmp_path / "tree"
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    root = dst / pristine["root"].name
    return {
        "root": root,
        "seg": root / SEG_DIR,
        "egress": dst / pristine["egress"].relative_to(src),
        "records": pristine["records"],
    }


def rpe(capsys, *argv: str) -> tuple[int, str]:
    """``rpe ARGV`` in this process: (exit code, stdout)."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().out


def seg_name(root: Path) -> str:
    (name,) = [f for f, d in family_registries(root).items() if d.resolve() == (root / SEG_DIR).resolve()]
    return name


def test_the_root_lists_both_families_root_first(built):
    fams = family_registries(built["root"])
    assert len(fams) == 2 and list(fams.values())[0] == built["root"]
    assert [s.log for s in audit_sources(registry=built["root"])] == [d / "audit.jsonl" for d in fams.values()]
    # naming the root's own log stands for the whole root
    assert [s.family for s in audit_sources([built["root"] / "audit.jsonl"])] == list(fams)


# --------------------------------------------------------------------------------------------------
# verify: yes on the clean tree, no (and named) on each kind of damage in the segmentation family


@pytest.mark.parametrize("how", ["--registry", "--log"])
def test_verify_on_the_root_says_yes_for_every_family(built, capsys, how):
    target = built["root"] if how == "--registry" else built["root"] / "audit.jsonl"
    code, out = rpe(capsys, "audit", "verify", how, str(target))
    assert code == 0, out
    for family, d in family_registries(built["root"]).items():
        assert f"family {family}: {d / 'audit.jsonl'}: OK, hash chain intact and every record" in out
    assert "every family OK (2 audit logs)" in out
    code, out = rpe(capsys, "audit", "verify", "--registry", str(built["root"]), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and len(data["families"]) == 2 and all(f["ok"] for f in data["families"])


def _edit_entry(seg: Path) -> tuple[str, str]:
    i = accepted_line(seg / "audit.jsonl", "RUNMC")
    tamper_line(seg / "audit.jsonl", i, '"bytes":', '"bytes":1')
    return f"line {i + 1}", "bad_hash"


def _delete_entry(seg: Path) -> tuple[str, str]:
    text = lines(seg / "audit.jsonl")
    del text[1]
    put(seg / "audit.jsonl", text)
    return "line 2", "seq_gap"


def _torn_tail(seg: Path) -> tuple[str, str]:
    with open(seg / "audit.jsonl", "ab") as fh:
        fh.write(b'{"seq": 99, "event": "compos')
    return f"line {len(lines(seg / 'audit.jsonl'))}", "torn_line"


def _log_removed(seg: Path) -> tuple[str, str]:
    (seg / "audit.jsonl").unlink()
    return "audit.jsonl does not exist", "missing"


def _log_emptied(seg: Path) -> tuple[str, str]:
    (seg / "audit.jsonl").write_bytes(b"")
    return "audit.jsonl is empty while", "missing"


def _config_removed(seg: Path) -> tuple[str, str]:
    (seg / "registry.json").unlink()
    return "registry.json does not exist", "missing"


def _record_edited(seg: Path) -> tuple[str, str]:
    rec = json.loads(lines(seg / "records.jsonl")[1])
    tamper_line(seg / "records.jsonl", 1, f'"sample_count":{rec["meta"]["sample_count"]}', '"sample_count":5000')
    return f"record {rec['id']}", "edited"


def _record_deleted(seg: Path) -> tuple[str, str]:
    text = lines(seg / "records.jsonl")
    rid = json.loads(text[1])["id"]
    del text[1]
    put(seg / "records.jsonl", text)
    return f"record {rid}", "deleted"


DAMAGE = {
    "edited audit entry": _edit_entry,
    "deleted audit entry": _delete_entry,
    "torn audit tail": _torn_tail,
    "audit log removed": _log_removed,
    "audit log emptied": _log_emptied,
    "registry.json removed": _config_removed,
    "record line edited": _record_edited,
    "record line deleted": _record_deleted,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_on_the_root_names_damage_in_the_segmentation_family(built, capsys, damage):
    where, kind = DAMAGE[damage](built["seg"])
    seg = seg_name(built["root"]) if (built["seg"] / "registry.json").exists() else SEG_DIR
    code, out = rpe(capsys, "audit", "verify", "--registry", str(built["root"]))
    assert code == 1, out
    bad = [line for line in out.splitlines() if line.startswith(f"family {seg}: ") and "OK" not in line]
    assert bad and any(where in line and kind in line for line in bad), out
    assert f"PROBLEMS in 1 of 2 families: {seg}" in out
    root_family = next(iter(family_registries(built["root"])))
    assert f"family {root_family}: {built['root'] / 'audit.jsonl'}: OK" in out  # the intact family says so
    code, js = rpe(capsys, "audit", "verify", "--registry", str(built["root"]), "--json")
    data = json.loads(js)
    assert code == 1 and not data["ok"]
    assert [f["family"] for f in data["families"] if not f["ok"]] == [seg]


def test_verify_on_the_root_names_a_root_registry_that_lost_its_registry_json(built, capsys):
    (built["root"] / "registry.json").unlink()
    for how, target in (("--registry", built["root"]), ("--log", built["root"] / "audit.jsonl")):
        code, out = rpe(capsys, "audit", "verify", how, str(target))
        assert code == 1 and f"{built['root'] / 'registry.json'} does not exist" in out, out
        assert f"family {seg_name(built['root'])}: {built['seg'] / 'audit.jsonl'}: OK" in out  # still checked


def test_verify_anchor_from_a_segmentation_receipt_detects_its_truncation(built, capsys, tmp_path):
    egress = [json.loads(x) for x in lines(built["egress"])]
    seg_id = json.loads((built["seg"] / "registry.json").read_text())["registry_id"]
    (receipt,) = [e["extra"]["receipt"] for e in egress if e["extra"]["receipt"]["body"]["registry_id"] == seg_id]
    anchor = tmp_path / "receipt.json"
    anchor.write_text(json.dumps(receipt))
    code, out = rpe(capsys, "audit", "verify", "--registry", str(built["root"]), "--anchor", str(anchor))
    assert code == 0 and "anchor seq" in out, out
    log = built["seg"] / "audit.jsonl"
    put(log, lines(log)[: receipt["body"]["seq"] - 1])  # cut the receipted entry and everything after
    text = lines(built["seg"] / "records.jsonl")
    put(built["seg"] / "records.jsonl", text[:0])  # (and the records they bound)
    code, out = rpe(capsys, "audit", "verify", "--registry", str(built["root"]), "--anchor", str(anchor))
    assert code == 1 and "anchor_mismatch" in out and f"family {seg_name(built['root'])}" in out, out


# --------------------------------------------------------------------------------------------------
# report


def test_report_on_the_root_covers_every_family(built, capsys):
    code, out = rpe(capsys, "audit", "report", "--registry", str(built["root"]))
    assert code == 0
    fams = family_registries(built["root"])
    for family in fams:
        assert f"== family {family} ==" in out
    assert "site RUNMC: 1 accepted" in out and "site b: 1 accepted" in out
    assert out.count("integrity: OK") == 2
    code, js = rpe(capsys, "audit", "report", "--log", str(built["root"] / "audit.jsonl"), "--json")
    data = json.loads(js)
    assert list(data["families"]) == list(fams)
    assert set(data["families"][seg_name(built["root"])]["sites"]) == {"a", "RUNMC", "BMC", "HK"}
    assert set(data["families"][next(iter(fams))]["sites"]) == {"a", "b", "c"}


def test_report_on_the_root_names_a_missing_family_log(built, capsys):
    (built["seg"] / "audit.jsonl").unlink()
    code, out = rpe(capsys, "audit", "report", "--registry", str(built["root"]))
    assert code == 0 and "INTEGRITY PROBLEMS (1)" in out and "does not exist" in out and "site b:" in out, out


def test_report_of_one_family_log_keeps_its_shape(built, capsys):
    code, js = rpe(capsys, "audit", "report", "--log", str(built["seg"] / "audit.jsonl"), "--json")
    assert code == 0 and set(json.loads(js)["sites"]) == {"a", "RUNMC", "BMC", "HK"}


# --------------------------------------------------------------------------------------------------
# cross-check: one check over all of a site's replies, in both families


@pytest.mark.parametrize(
    "scope",
    [
        ["--registry", "{root}"],
        ["--audit", "{root}/audit.jsonl"],
        ["--audit", "{root}/audit.jsonl", "--audit", "{seg}"],
    ],
    ids=["registry", "root-log", "two-logs"],
)
def test_cross_check_of_a_site_in_both_families_is_ok_when_untampered(built, capsys, scope):
    argv = [a.format(root=built["root"], seg=built["seg"] / "audit.jsonl") for a in scope]
    code, out = rpe(capsys, "audit", "cross-check", "--egress", str(built["egress"]), "--site", "a", *argv)
    assert code == 0, out
    assert "cross-check for site a: OK (2 matched, 0 coordinator-only, 0 site-only)" in out
    assert "receipts: 2 checked" in out


def test_cross_check_against_one_family_only_says_why_it_mismatches(built):
    """The root's log alone (copied out of its registry, so it stands for nothing else): the
    segmentation reply is unaccounted for and its receipt names a registry that was not checked."""
    lone = built["root"].parent / "lone-audit.jsonl"
    shutil.copy(built["root"] / "audit.jsonl", lone)
    rep = cross_check(built["egress"], lone, "a", coordinator_key=built["root"] / "coordinator.pub")
    assert not rep.ok and len(rep.matched) == 1 and len(rep.site_only) == 1


def test_cross_check_names_the_tampered_line_in_the_segmentation_log(built, capsys):
    log = built["seg"] / "audit.jsonl"
    i = accepted_line(log, "a")
    entry = json.loads(lines(log)[i])
    digest = entry["record_digests"]["adapter"]
    tamper_line(log, i, digest, digest[:-4] + "0000")
    code, out = rpe(
        capsys,
        "audit",
        "cross-check",
        "--egress",
        str(built["egress"]),
        "--site",
        "a",
        "--registry",
        str(built["root"]),
    )
    seg = seg_name(built["root"])
    assert code == 1 and "MISMATCH" in out, out
    assert f"audit log problem: {seg}: line {i + 1} (seq {entry['seq']}): bad_hash" in out
    assert f"coordinator recorded {seg} seq {entry['seq']} (submission.accepted)" in out
    rep = cross_check(built["egress"], {s.family: s.log for s in audit_sources(registry=built["root"])}, "a")
    assert [c["log"] for c in rep.coordinator_only] == [seg]


def test_cross_check_with_a_family_log_missing_is_a_mismatch(built, capsys):
    (built["seg"] / "audit.jsonl").unlink()
    code, out = rpe(
        capsys,
        "audit",
        "cross-check",
        "--egress",
        str(built["egress"]),
        "--site",
        "a",
        "--registry",
        str(built["root"]),
    )
    assert code == 1 and "does not exist" in out, out


# --------------------------------------------------------------------------------------------------
# no symlink in a registry; a family registry copied on its own opens


def test_family_registry_holds_no_symlink_and_a_copy_of_it_opens_alone(built, tmp_path, capsys):
    root, seg = built["root"], built["seg"]
    assert not [p for p in root.rglob("*") if p.is_symlink()]
    for name in ("coordinator.key", "coordinator.pub"):
        assert (seg / name).read_bytes() == (root / name).read_bytes()
    assert oct((seg / "coordinator.key").stat().st_mode & 0o777) == "0o600"
    alone = tmp_path / "copied" / "segmentation"
    shutil.copytree(seg, alone, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    with Registry(alone, chroma="off") as reg:
        rec = reg.list(site="HK")[0]
        receipt = reg.receipt(rec.id)
    # the copy still signs as the coordinator: the key every site pinned verifies it
    assert verify_statement(load_public_key(root / "coordinator.pub"), receipt, "receipt")["record_id"] == rec.id
    code, out = rpe(capsys, "registry", "ls", "--registry", str(alone))
    assert code == 0 and rec.id in out
    code, out = rpe(capsys, "audit", "verify", "--registry", str(alone))
    assert code == 0, out
    # on its own it is still the segmentation family (not taken for the root's family)
    assert family_registries(alone) == {seg_name(root): alone}


def test_a_copy_made_before_the_links_were_replaced_can_still_be_read(built, tmp_path, capsys):
    """A family registry copied with the older layout's links (now dangling): the read-only tools
    (listing, verify, the console) open it; only a writing open needs the key back."""
    from server.console import views

    seg = built["seg"]
    for name in ("coordinator.key", "coordinator.pub"):
        (seg / name).unlink()
        os.symlink(os.path.join("..", name), seg / name)
    alone = tmp_path / "copied" / "segmentation"
    shutil.copytree(seg, alone, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    assert (alone / "coordinator.key").is_symlink() and not (alone / "coordinator.key").exists()
    code, out = rpe(capsys, "registry", "ls", "--registry", str(alone))
    assert code == 0 and "RUNMC" in out, out
    code, out = rpe(capsys, "audit", "verify", "--registry", str(alone))
    assert code == 0, out
    fams = views.open_families(family_registries(alone))
    try:
        assert [f.error for f in fams] == [None] and len(fams[0].registry) == 4
    finally:
        fams[0].registry.close()


def test_the_console_shows_a_family_it_cannot_open_with_the_reason(built):
    from server.console import views

    (built["seg"] / "registry.json").unlink()
    fams = views.open_families(family_registries(built["root"]))
    try:
        broken = [f for f in fams if f.registry is None]
        assert [f.path for f in broken] == [built["seg"]] and "registry.json" in broken[0].error
        st = views.audit_statuses(fams)
        assert not st["ok"] and {p["kind"] for p in st["problems"]} == {"missing", "unreadable"}
        assert [p["family"] for p in st["problems"]] == [broken[0].name] * 2
        assert len(views.records(fams)) == 3  # the other family's records are still listed
    finally:
        for f in fams:
            if f.registry is not None:
                f.registry.close()


def test_an_older_linked_key_becomes_a_copy_when_the_run_opens_the_family(built):
    """Registries made before this change link the key; the ServerApp's open replaces the links."""
    from server.bootstrap import open_registry
    from server.settings import Settings

    root, seg = built["root"], built["seg"]
    for name in ("coordinator.key", "coordinator.pub"):
        (seg / name).unlink()
        os.symlink(os.path.join("..", name), seg / name)
    s = Settings.from_run_config(
        {"registry-dir": str(root), "task": "segmentation", "mode": "enroll", "chroma": "off"}, env={}
    )
    reg = open_registry(s)
    try:
        assert reg.path == seg.resolve()
    finally:
        reg.close()
    for name in ("coordinator.key", "coordinator.pub"):
        assert not (seg / name).is_symlink() and (seg / name).read_bytes() == (root / name).read_bytes()
    assert audit_mod.verify(seg / "audit.jsonl") == []


# --------------------------------------------------------------------------------------------------
# the console's evaluation view reads the score by the family's metric name


def test_evaluation_reads_each_familys_metric_column_by_name(pristine):
    from support.two_family import FAMILIES, score

    from server.console import views

    fams = views.open_families(family_registries(pristine["root"]))
    try:
        runs = views.evaluation_runs(fams)
        assert sorted(r["family"] for r in runs) == sorted(f.name for f in fams)
        for key, spec in FAMILIES.items():
            f = next(f for f in fams if f.path == pristine["dirs"][key])
            ev = views.evaluation(fams, f"run-{key}")
            assert ev["family"] == f.name and ev["metric"] == spec["metric"]
            t = spec["sites"][1]
            assert ev["table"][f"{t}|sim"] == pytest.approx(score(key, t, "sim"))
        assert views.evaluation(fams, "run-seg")["metric_title"] == "DICE"
        assert "ROUGE-L" in views.evaluation(fams, "run-report")["metric_title"]
        with pytest.raises(views.ConsoleInputError, match="no evaluation run"):
            views.evaluation(fams, "run-seg", family_name=fams[0].name)  # it is not the root family's run
    finally:
        for f in fams:
            f.registry.close()


def test_a_family_the_table_does_not_know_shows_its_own_metric(tmp_path):
    """A registry of a family without an entry in the table (a toy family's ``accuracy``): found
    under the root by its files, its results.csv score shown under its own column name."""
    from server.console import views

    root = tmp_path / "root"
    toy = root / "toy-family"
    Registry.init(toy, base_fingerprint="sha256:" + "12" * 32, module_shapes={"m": (4, 4)}, embedding_dim=3).close()
    run = toy / "evaluations" / "run-1"
    run.mkdir(parents=True)
    (run / "results.csv").write_text(
        "target,method,accuracy,n,sources,weights,min_distance\nx,sim,0.8125,4,y,1.0000,0.5\nx,own,0.9,4,,,\n"
    )
    found = family_registries(root)
    assert found == {"toy-family": toy}
    fams = views.open_families(found)
    try:
        ev = views.evaluation(fams, "run-1")
        assert ev["metric"] == "accuracy" and ev["metric_title"] == "accuracy"
        assert ev["table"] == {"x|sim": 0.8125, "x|own": 0.9}
        assert [m["name"] for m in ev["metrics"]] == ["accuracy"]
    finally:
        fams[0].registry.close()


@pytest.mark.parametrize("damage", ["none", "segmentation registry.json removed", "root audit log removed"])
def test_every_console_page_answers_for_every_family(built, damage):
    """Every page and chart of the console over the two-family root answers 200 and names both
    families, also when one family's registry is damaged (its problem is shown, not a 500)."""
    from starlette.testclient import TestClient

    from server.console import views
    from server.console.app import create_app

    if damage.startswith("segmentation"):
        (built["seg"] / "registry.json").unlink()
    elif damage.startswith("root"):
        (built["root"] / "audit.jsonl").unlink()
    before = {str(p): p.read_bytes() for p in sorted(built["root"].rglob("*")) if p.is_file() and p.name != ".lock"}
    app = create_app(built["root"])
    fams = app.state.console.families
    try:
        with TestClient(app) as client:
            pages = ["/", "/registry", "/compositions", "/audit", "/privacy", "/evaluations"]
            for f in fams:
                q = f"?family={f.name}"
                run = "seg" if f.path != built["root"] else "report"
                pages += [f"/registry{q}", f"/registry/map.svg{q}", f"/evaluations/run-{run}{q}"]
                if f.registry is not None:
                    pages.append(f"/registry/record/{f.registry.list()[0].id}{q}")
            for c in views.compositions(fams):
                q = f"?family={c['family']}"
                pages += [f"/compositions/{c['seq']}{q}", f"/compositions/{c['seq']}/weights.svg{q}"]
            for url in pages:
                r = client.get(url)
                broken = next((f for f in fams if f.registry is None and f"family={f.name}" in url), None)
                if broken is not None and ("map.svg" in url or "/registry/record/" in url):
                    assert r.status_code == 404, url
                    continue
                assert r.status_code == 200, (url, r.status_code, r.text[-500:])
                if url.endswith(".svg") or ".svg?" in url:
                    assert r.text.lstrip().startswith("<?xml") or "<svg" in r.text[:500]
                else:
                    for f in fams:
                        assert f'data-family="{f.name}"' in r.text, (url, f.name)
            audit = client.get("/audit").text
            if damage != "none":
                assert "BROKEN" in audit and "missing" in audit
            else:
                assert "OK: hash chain intact" in audit
        after = {str(p): p.read_bytes() for p in sorted(built["root"].rglob("*")) if p.is_file() and p.name != ".lock"}
        assert after == before  # the console wrote nothing, not even into a damaged family
    finally:
        for f in fams:
            if f.registry is not None:
                f.registry.close()
