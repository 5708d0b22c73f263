"""The segmentation family's part of the demo federation (``deploy/demo.py``): the six real
prostate MRI sites (RUNMC, BMC, I2CVB, UCL, BIDMC, HK; ``prostate-multisite`` from the data root)
on LiteMedSAM: LoRA on the mask decoder, z = the encoder's spatial mean, scored by DICE. At the end
one of them (``HK``) receives a composition of the other five sites' adapters (its own left out),
to try with ``rpe segment`` on its held-out slices (DICE against their masks, stored inverted).

Why an enrolled site and not a new one, as the report family's target: a segmentation site is a
site of a multi-site set named by its node config, and this family has no images-only site folder
(a new hospital's slices without masks) to load a site from yet."""

from __future__ import annotations

from pathlib import Path

from common.families.base import DemoPlan, DemoSite

SEG_DATASET = "prostate-multisite"
SEG_SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
#: each prostate site holds only 5-6 slices (3 train + 2-3 test), fewer than the release policy's
#: safe defaults (z over >= 10 examples, metrics over >= 10 held-out items): each site's node config
#: loosens them for itself, explicitly, as a hospital would have to (``client/policy.py``)
SEG_RELEASE = {"z-min-examples": 5, "metrics-min-reports": 2}
#: the site that receives the demo's delivery (the composition of the OTHER sites' adapters)
TARGET_SITE = "HK"
#: (steps, augmented copies per training slice, k) per demo profile
PROFILES = {"quick": (12, 1, 5), "full": (60, 3, 5)}


def demo_plan(workdir: Path, profile: str, model: str) -> DemoPlan:
    """One site per prostate site; its node config names the data set and the site it holds."""
    from common.families.segmentation.data import data_root

    steps, copies, k = PROFILES[profile]
    sites = [
        DemoSite(
            site,
            str(data_root()),
            {"seg-dataset": SEG_DATASET, "seg-site": site, "seg-copies": copies},
            dict(SEG_RELEASE),
        )
        for site in SEG_SITES
    ]
    config = {"base-model": model, "steps": steps, "batch-size": 2, "lora-r": 4, "lora-alpha": 8.0, "lr": 2e-3, "k": k}
    held_out = data_root() / SEG_DATASET / TARGET_SITE / "test"
    return DemoPlan(
        sites,
        model,
        config,
        target=next(d for d in sites if d.site == TARGET_SITE),
        # DICE against the site's reference masks, which this set stores inverted (0 = prostate)
        try_argv=(
            "segment",
            "--adapter",
            "{adapter}",
            "--images",
            str(held_out / "image"),
            "--masks",
            str(held_out / "mask"),
            "--mask-foreground",
            "0",
            "--out",
            "{out}",
        ),
    )
