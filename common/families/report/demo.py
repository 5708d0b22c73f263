"""The report family's part of the demo federation (``deploy/demo.py``): one site per report
group of the real data (IU X-ray chest; MedPix CT abdomen, CT head, MR head), each with its own
training reports and held-out reports in ``<workdir>/<site>/{train,eval}.jsonl``, on
SmolLM2-135M-Instruct, scored by ROUGE-L. At the end a new site (``new-ct-thorax``: CT thorax
findings, no reports written yet, in ``<workdir>/new-ct-thorax/unlabeled.jsonl``) receives one
composition of the enrolled sites' adapters, to try with ``rpe generate``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.families.base import DemoPlan, DemoSite

DEFAULT_SITES = {"xray": "xray-chest", "ct-abdomen": "ct-abdomen", "ct-head": "ct-head", "mr-head": "mr-head"}
#: the unlabelled target site of the demo's delivery and the report group its findings come from
#: (a group no enrolled site holds: what a new hospital would bring)
TARGET_SITE, TARGET_GROUP = "new-ct-thorax", "ct-thorax"


@dataclass(frozen=True)
class ReportProfile:
    n_train: int
    n_eval: int
    steps: int
    batch_size: int
    max_length: int


#: ``quick`` fits two CPU cores; ``full`` is for a GPU
PROFILES = {
    "quick": ReportProfile(n_train=48, n_eval=12, steps=30, batch_size=4, max_length=160),
    "full": ReportProfile(n_train=400, n_eval=50, steps=300, batch_size=8, max_length=256),
}
#: findings (no impressions) the unlabelled target holds, per profile: enough for its release policy's
#: z-min-examples (10 by default) with a margin, few enough that trying the delivery takes seconds
TARGET_REPORTS = {"quick": 16, "full": 50}


def prepare_sites(root: Path, profile: ReportProfile, sites: dict[str, str], seed: int = 0) -> dict[str, Path]:
    """Write each site's private train/eval reports (what would live inside a hospital)."""
    from common.families.report.data import report_groups, split, write_jsonl

    groups = report_groups()
    out = {}
    for site, group in sites.items():
        if group not in groups:
            raise ValueError(f"report group {group!r} does not exist; available: {sorted(groups)}")
        train, held = split(groups[group], profile.n_eval, seed=seed)
        write_jsonl(root / site / "train.jsonl", train[: profile.n_train])
        write_jsonl(root / site / "eval.jsonl", held)
        out[site] = root / site
    return out


def prepare_target(root: Path, n: int, group: str = TARGET_GROUP, seed: int = 0) -> Path:
    """The unlabelled target's findings: ``root/unlabeled.jsonl``, ``n`` reports of ``group`` without
    their impression (``target`` left out), as a hospital that wrote none yet would hold them."""
    from common.families.report.data import Example, report_groups, split, write_jsonl

    groups = report_groups()
    if group not in groups:
        raise ValueError(f"report group {group!r} does not exist; available: {sorted(groups)}")
    _, picked = split(groups[group], n, seed=seed)
    return write_jsonl(root / "unlabeled.jsonl", [Example(e.prompt, None, e.group, e.uid) for e in picked])


def demo_plan(workdir: Path, profile: str, model: str) -> DemoPlan:
    """The report sites (their data written under ``workdir``), their training settings, and the
    unlabelled target that receives a composition at the end."""
    from common.models import resolve_model_dir

    p = PROFILES[profile]
    data = prepare_sites(workdir, p, DEFAULT_SITES)
    target = prepare_target(workdir / TARGET_SITE, TARGET_REPORTS[profile])
    model_dir = str(resolve_model_dir(model))
    return DemoPlan(
        [DemoSite(site, str(path)) for site, path in data.items()],
        model_dir,
        {"base-model": model_dir, "steps": p.steps, "batch-size": p.batch_size, "max-length": p.max_length},
        target=DemoSite(TARGET_SITE, str(target.parent)),
        try_argv=("generate", "--adapter", "{adapter}", "--data", str(target), "--out", "{out}.jsonl"),
    )
