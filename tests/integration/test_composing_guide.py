"""docs/COMPOSING.md, run from the document: compose by hand on both families, see the "nothing
close enough" check and ``update-norm``, then audit what was composed.

Every shell block of the guide is read from it (``support.doc_commands``) and each ``rpe`` command
runs in this process (``support.cli``), in order, on a federation laid out as the demo's output
(``runs/demo``: report sites xray, ct-abdomen, ct-head, mr-head and the unenrolled new-ct-thorax;
prostate sites RUNMC, BMC, I2CVB, UCL), enrolled by the real ServerApp and ClientApps of the
in-process grid with the tiny test models. The guide's paths are rewritten by REWRITE (the demo's
folder, the data root) and ``rpe embed`` is given the tiny model its registry was built with
(EMBED_MODEL): nothing else changes. The tiny models' distances are not the demo's, so the test
checks what every run shows (the adapter written, one nearness line per composition, the
update-norm line, the audit report's lines for exactly those compositions), while
``tests/unit/test_nearness_surfaces.py`` / ``tests/unit/test_audit_report_nearness.py`` pin warned
vs not warned. In integration/ (not started processes, but two in-process enrolment runs).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from support import write_site_data
from support.cli import rpe_run
from support.doc_commands import blocks
from support.grid import enrol_keys, flower_task_identity, run_server_app, site_context
from support.seg import SEG_RELEASE, seg_config, seg_node_config

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "COMPOSING.md"
REPORT_SITES = {"xray": "xray-chest", "ct-abdomen": "ct-abdomen", "ct-head": "ct-head", "mr-head": "mr-head"}
SEG_SITES = ("RUNMC", "BMC", "I2CVB", "UCL")

pytestmark = pytest.mark.integration  # ~25 s on a quiet 2-core machine: two enrolment runs


def rewrite(command: str, demo: Path, data_root: Path) -> str:
    """REWRITE: the demo's folder and the data root beside the checkout, to this test's."""
    return command.replace("runs/demo", str(demo)).replace("../shared/data", str(data_root))


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir, tiny_sam_dir):
    """``runs/demo`` as the guide expects it: data folders and a two-family registry, enrolled."""
    import torch

    from common.families.report.data import report_groups, write_jsonl
    from server.allowlist import AllowList

    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("composing")
    demo = tmp / "demo"
    registry = demo / "registry"
    data = write_site_data(demo / "data" / "report-text", REPORT_SITES, n=14, n_eval=4)
    thorax = [replace(e, target=None) for e in report_groups()["ct-thorax"][:6]]
    write_jsonl(demo / "data" / "report-text" / "new-ct-thorax" / "unlabeled.jsonl", thorax)
    allow = AllowList(tmp / "allowlist.json")
    nodes = {}
    with flower_task_identity():
        for i, (site, path) in enumerate(sorted(data.items()), start=101):
            nc = {
                "site-id": site,
                "data-path": str(path),
                "model-path": str(tiny_model_dir),
                "site-dir": str(tmp / "sites" / site),
                "threads": 1,
                "metrics-min-reports": 1,
            }
            nodes[i] = site_context(i, enrol_keys(tmp, allow, registry, site, nc))
        for i, site in enumerate(SEG_SITES, start=201):
            nc = {
                "site-id": site,
                "model-path": str(tiny_sam_dir),
                "site-dir": str(tmp / "sites" / site),
                "threads": 1,
                **seg_node_config(site),
                **SEG_RELEASE,
            }
            nodes[i] = site_context(i, enrol_keys(tmp, allow, registry, site, nc))
        report_rc = {
            "registry-dir": str(registry),
            "base-model": str(tiny_model_dir),
            "chroma": "off",
            "steps": 2,
            "lora-r": 4,
            "lora-alpha": 8.0,
            "max-length": 128,
            "sites": ",".join(REPORT_SITES),
        }
        seg_rc = seg_config(registry, tiny_sam_dir, sites=",".join(SEG_SITES))
        for run_id, rc in ((1, report_rc), (2, seg_rc)):
            report, _ = run_server_app(nodes, run_id, {"allowlist": str(allow.path), **rc, "mode": "enroll"})
            assert report["status"] == "completed", report
    torch.set_num_threads(threads)
    from server.registry import Registry

    for path, sites in ((registry, REPORT_SITES), (registry / "segmentation", SEG_SITES)):
        with Registry(path, read_only=True) as reg:
            assert sorted(r.meta.site for r in reg.list()) == sorted(sites), path  # every site enrolled
    return {"demo": demo, "report": tiny_model_dir, "segmentation": tiny_sam_dir}


def test_the_guide_runs_as_written(capsys, demo):
    from common.families.segmentation.data import data_root

    assert GUIDE.is_file()
    commands = [c for b in blocks(GUIDE) for c in b.commands]
    assert commands, "docs/COMPOSING.md has no shell block"
    composed: list[tuple[str, str]] = []  # (target, the nearness line rpe compose printed)
    frobenius = 0
    for original in commands:
        argv = shlex.split(rewrite(original, demo["demo"], data_root()), comments=True)
        assert argv[0] == ".venv/bin/rpe", f"the guide tells the reader to run {original!r}: only rpe commands here"
        argv = argv[1:]
        if argv[0] == "embed":  # EMBED_MODEL: the tiny model the test registry was built with
            family = argv[argv.index("--family") + 1] if "--family" in argv else "report-text"
            argv += ["--model", str(demo["segmentation" if family == "segmentation" else "report"])]
        code, out, err = rpe_run(capsys, *argv)
        assert code == 0, (original, out[-2000:], err[-2000:])
        if argv[0] == "compose":
            assert "composed adapter written to" in out, (original, out)
            near = [ln for ln in out.splitlines() if ln.startswith(("WARNING nothing close enough", "nearness:"))]
            assert len(near) == 1, (original, out)
            composed.append((argv[argv.index("--target") + 1], near[0]))
            if "--update-norm" in argv and argv[argv.index("--update-norm") + 1] == "frobenius":
                assert "update-norm frobenius: scales c_i " in out, (original, out)
                frobenius += 1
        if argv[:2] == ["audit", "report"] and "--json" not in argv:
            # the auditor's report shows, under each composition the guide made, the line rpe compose printed
            lines = out.splitlines()
            for target, near in composed:
                heads = [i for i, x in enumerate(lines) if x.startswith("composition ") and f" for {target} (" in x]
                assert heads, (target, out[-3000:])
                shown = {lines[i + 1].strip() for i in heads} | {lines[i + 2].strip() for i in heads}
                assert near in shown, (target, near, out[-3000:])
        if argv[:2] == ["audit", "report"] and "--json" in argv:
            rep = json.loads(out)["families"]
            recorded = [c for fam in rep.values() for c in fam["compositions"]]
            modes = {c["target"]: (c.get("normalisation") or {}).get("mode") for c in recorded}
            assert "frobenius" in modes.values(), modes
    targets = {t for t, _ in composed}
    assert len(targets) >= 4 and frobenius >= 1, composed  # both families, near and far, and update-norm
    ran = {shlex.split(c)[1] for c in commands}
    assert {"embed", "compose", "audit"} <= ran, ran
