"""The real two-family run the auditor's tools are checked on (``clean``: enrolment, a delivered
composition, a leave-one-site-out evaluation, once per module on the in-process grid), its copies,
and each kind of damage done to a copy (``DAMAGE``), with the ``rpe audit`` commands that judge it
(``test_auditor_truth.py``, ``test_console_truth.py``).

Fixture (``tests/conftest.py`` makes it visible to every test): ``clean`` (module scope, on
``local`` of :mod:`support.seg`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.trust.digests import canonical_json
from server.audit import entry_hash, head, line_hash
from server.coordroot import audit_sources
from support.cli import rpe as _rpe
from support.seg import report_config, run_local, seg_config

SITES = ("a", "b", "RUNMC", "BMC")


@pytest.fixture(scope="module")
def clean(local):
    """The real two-family run, once for the module: enrol both, compose for a, evaluate segmentation."""
    reg_dir: Path = local["registry"]
    report_rc = report_config(local)
    assert run_local(local, 61, {**report_rc, "mode": "enroll"})["status"] == "completed"
    seg = run_local(local, 62, seg_config(reg_dir, local["sam"], mode="enroll", sites="RUNMC,BMC"))
    assert {s: r["status"] for s, r in seg["enroll"].items()} == {"RUNMC": "accepted", "BMC": "accepted"}
    composed = run_local(local, 63, {**report_rc, "mode": "compose", "target": "a", "strategy": "sim", "k": 1})
    assert composed["compose"]["a"]["status"] == "delivered", composed["compose"]
    ev = run_local(local, 64, seg_config(reg_dir, local["sam"], mode="evaluate", k=1, **{"eval-strategies": "sim"}))
    assert ev["status"] == "completed", ev.get("error")
    logs = {s.family: s.log for s in audit_sources(registry=reg_dir)}
    return {
        "root": reg_dir,
        "egress": {s: local["tmp"] / "sites" / s / "egress.jsonl" for s in SITES},
        "logs": logs,
        "heads": {f: head(p) for f, p in logs.items()},
    }


def _copy(clean, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "root"
    shutil.copytree(clean["root"], root, symlinks=True)
    return root, {s.family: s.log for s in audit_sources(registry=root)}


def _report_log(logs: dict[str, Path], root: Path) -> Path:
    return next(p for p in logs.values() if p.parent == root)


def _entries(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()]


def _write_rechained(log: Path, entries: list[dict]) -> None:
    """Write entries with every prev and hash recomputed: what a forger who knows the format does."""
    prev = "0" * 64
    out = []
    for e in entries:
        e = {**e, "prev": prev}
        e["hash"] = entry_hash(e)
        prev = line_hash(e)
        out.append(canonical_json(e))
    log.write_text("\n".join(out) + "\n")


def _verify(capsys, root: Path, *extra: str) -> tuple[int, str]:
    return _rpe(capsys, "audit", "verify", "--registry", str(root), *extra)


def _cross(capsys, root: Path, site: str, egress: Path) -> tuple[int, str]:
    return _rpe(capsys, "audit", "cross-check", "--egress", str(egress), "--site", site, "--registry", str(root))


def _export(capsys, root: Path, clean, out: Path) -> tuple[int, dict]:
    args = [f"--egress={s}={clean['egress'][s]}" for s in SITES]
    code, text = _rpe(capsys, "audit", "export", "--registry", str(root), *args, "--out", str(out))
    assert code == 0, text
    code, checked = _rpe(capsys, "audit", "check-report", str(out), "--key", str(root / "coordinator.pub"))
    assert code == 0 and "signature OK" in checked, checked
    return code, json.loads(out.read_text()) if out.suffix == ".json" else {}


def _damage_edited_record(root: Path, logs: dict[str, Path]) -> str:
    records = root / "records.jsonl"
    lines = records.read_text().splitlines()
    rec = json.loads(lines[0])
    lines[0] = lines[0].replace('"sample_count":', '"sample_count":9', 1)
    records.write_text("\n".join(lines) + "\n")
    return rec["id"]


def _damage_edited_audit_line(root: Path, logs: dict[str, Path]) -> str:
    log = _report_log(logs, root)
    lines = log.read_text().splitlines()
    i = next(n for n, x in enumerate(lines) if '"event":"composition"' in x)
    lines[i] = lines[i].replace('"strategy":"sim"', '"strategy":"lin"', 1)
    log.write_text("\n".join(lines) + "\n")
    return f"line {i + 1} (seq {json.loads(lines[i])['seq']}): bad_hash"


def _damage_forged_composition(root: Path, logs: dict[str, Path]) -> str:
    log = _report_log(logs, root)
    entries = _entries(log)
    i = next(n for n, e in enumerate(entries) if e["event"] == "composition")
    entries[i]["retrieved"] = ["z:report-text:0000000000000000"]
    _write_rechained(log, entries)
    return "retrieved adapter 'z:report-text:0000000000000000' is no record of this registry"


def _damage_edited_snapshot(root: Path, logs: dict[str, Path]) -> str:
    import hashlib

    from server.registry import Registry, snapshot

    old = snapshot.MIN_RECORDS
    snapshot.MIN_RECORDS = 1
    try:
        # a snapshot as the coordinator writes it on close, then forged as someone editing it would
        Registry(root, chroma="off").close()
        path = root / snapshot.SNAP_NAME
        raw = path.read_bytes()
    finally:
        snapshot.MIN_RECORDS = old
    m = len(snapshot.MAGIC)
    hl = int.from_bytes(raw[m : m + 8], "little")
    h, body = json.loads(raw[m + 8 : m + 8 + hl]), bytearray(raw[m + 8 + hl :])
    n, ib = int(h["n"]), int(h["ids_bytes"])
    body[ib + 8 * n] ^= 1  # the first record's liveness: withdrawn / hidden
    h["body_sha256"] = hashlib.sha256(bytes(body)).hexdigest()
    hb = json.dumps(h, sort_keys=True).encode()
    path.write_bytes(snapshot.MAGIC + len(hb).to_bytes(8, "little") + hb + bytes(body))
    return snapshot.SNAP_NAME


DAMAGE = {
    "edited-record": _damage_edited_record,
    "edited-snapshot": _damage_edited_snapshot,
    "edited-audit-line": _damage_edited_audit_line,
    "forged-composition": _damage_forged_composition,
}
