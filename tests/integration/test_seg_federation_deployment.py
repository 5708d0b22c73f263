"""Segmentation sites in the federation on a real Flower deployment (TLS, SuperNode auth, signed
submissions): one segmentation site and two idle report sites; the segmentation site's enrolment and
a composition for it, delivered and scored (DICE) at the site. (Report enrolment over real SuperNodes
is tests/integration/test_federation_deployment.py; both families in-process:
tests/unit/test_seg_federation.py.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from support.seg import REPORT_RELEASE, SEG_RELEASE, make_report_data, seg_config, seg_node_config

from deploy import launch

REPO = Path(__file__).resolve().parents[2]


# -- a real deployment ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sam_dir: Path):
    tmp = tmp_path_factory.mktemp("seg-federation")
    data = make_report_data(tmp / "data")
    specs = [launch.SiteSpec(site, str(path), str(tiny_model_dir), threads=1) for site, path in data.items()]
    nc = seg_node_config("RUNMC")
    specs.append(
        launch.SiteSpec("RUNMC", nc.pop("data-path"), str(tiny_sam_dir), threads=1, extra=nc, release=dict(SEG_RELEASE))
    )
    for spec in specs[:2]:
        spec.release = dict(REPORT_RELEASE)
    workdir = tmp / "deploy"
    t0 = time.monotonic()
    try:
        state = launch.up(workdir, specs, port=launch.free_port(), timeout=90.0, registry=str(tmp / "registry"))
        print(f"deployment up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        yield {
            "tmp": tmp,
            "registry": tmp / "registry",
            "model": tiny_model_dir,
            "sam": tiny_sam_dir,
            "flwr_home": Path(state["flwr_home"]),
            "site_dirs": {s.site: Path(s.site_dir) for s in specs},
        }
    finally:
        launch.down(workdir, timeout=15.0)
        state = launch.load_state(workdir)
        procs = [state["superlink"], *state["sites"].values()] if state.get("superlink") else []
        assert not [p["pid"] for p in procs if launch.is_alive(p["pid"], p["start_time"])]


def flwr_run(fed: dict, config: dict) -> dict:
    return launch.run_app(fed["flwr_home"], REPO, config, fed["registry"], 240.0)


@pytest.mark.slow
@pytest.mark.integration
def test_segmentation_site_enrols_and_receives_a_scored_composition_on_real_supernodes(fed):
    from server.registry import Registry

    common = {"chroma": "off", "require-signatures": True, "timeout-train": 180.0, "timeout-query": 90.0}
    # The report sites a and b stay idle in this mixed deployment: a run addressed to RUNMC alone must not
    # need them (report enrolment into the same registry dir is test_local_both_families_..., in-process).
    t0 = time.monotonic()
    run = flwr_run(fed, {**seg_config(fed["registry"], fed["sam"], mode="enroll", sites="RUNMC"), **common})
    assert run["status"] == "finished:completed", run
    res = run["report"]["enroll"]["RUNMC"]
    assert res["status"] == "accepted" and res["signed"], res
    print(f"segmentation enrolment {time.monotonic() - t0:.1f} s", file=sys.stderr)

    t0 = time.monotonic()
    run = flwr_run(
        fed,
        {
            **seg_config(
                fed["registry"],
                fed["sam"],
                mode="compose",
                target="RUNMC",
                k=1,
                **{"include-own": True, "strategy": "sim"},
            ),
            **common,
        },
    )
    print(f"segmentation compose {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert run["status"] == "finished:completed", run
    out = run["report"]["compose"]["RUNMC"]
    assert out["status"] == "delivered" and out["evaluated"], out
    assert out["sites"] == ["RUNMC"] and 0.0 <= out["metrics"]["dice"] <= 1.0
    delivered = fed["site_dirs"]["RUNMC"] / "adapters" / out["adapter_name"]
    assert (delivered / "adapter_config.json").is_file()
    provenance = json.loads((delivered / "rpe-provenance.json").read_text())
    assert provenance["blob_sha256"] == out["blob_sha256"] and provenance["task"] == "segmentation"
    with Registry(fed["registry"] / "segmentation", chroma="off") as segs:
        assert [r.meta.site for r in segs.list()] == ["RUNMC"]
    egress = [json.loads(line) for line in (fed["site_dirs"]["RUNMC"] / "egress.jsonl").read_text().splitlines()]
    assert {e["message_type"] for e in egress} >= {"query.whoami", "train", "query.embed", "train.apply"}
