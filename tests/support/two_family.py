"""A coordinator registry root with two task families, built with the real components.

The layout the ServerApp makes (``server/bootstrap.py``): the root is the report family's registry
and the segmentation family's registry is ``<root>/segmentation`` (its own z dimension, 256 as the
LiteMedSAM encoder's, its own audit chain), sharing the coordinator's key. Site ``a`` answers runs
of both families and keeps one egress log for all its replies (with the coordinator's receipts),
as a real site does. Each family has one composition and one evaluation run whose ``results.csv``
holds known numbers under the family's metric column (``rouge_l``, ``dice``).

Used by ``test_every_family.py`` (the audit commands) and ``test_console.py`` (the browser test).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.egress import EgressLog
from common.adapters import LoraAdapter, LoraModule, adapter_to_arrays
from common.trust.digests import record_digests
from server.bootstrap import share_coordinator_key
from server.composer import compose_for_target
from server.registry import AdapterMeta, Registry

SEG_DIR = "segmentation"
#: per family: base fingerprint, module shapes, z dim, task name on the records, sites, metric column
FAMILIES: dict[str, dict[str, Any]] = {
    "report": {
        "subdir": "",
        "base": "sha256:" + "5e" * 32,
        "shapes": {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (6, 10)},
        "dim": 8,
        "representation": "hidden-mean",
        "task": "report-text",
        "sites": ["a", "b", "c"],
        "metric": "rouge_l",
    },
    "seg": {
        "subdir": SEG_DIR,
        "base": "sha256:" + "7f" * 32,
        "shapes": {"image_encoder.blocks.0.attn.qkv": (24, 16), "mask_decoder.transformer.0.mlp": (16, 16)},
        "dim": 256,
        "representation": "sam-encoder-mean",
        "task": "segmentation",
        "sites": ["a", "RUNMC", "BMC", "HK"],
        "metric": "dice",
    },
}
METHODS = ("base", "sim", "lin-l1", "own")


def _adapter(shapes: dict[str, tuple[int, int]], seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    r = 1 + seed % 3
    return LoraAdapter(
        {
            n: LoraModule(torch.randn(r, s[1], generator=g), torch.randn(s[0], r, generator=g), 2.0)
            for n, s in shapes.items()
        }
    )


def score(family: str, target: str, method: str) -> float:
    """The known number results.csv holds for (target, method) of a family (4 decimals)."""
    base = 0.21 if family == "report" else 0.61
    return round(base + 0.01 * METHODS.index(method) + 0.001 * (sum(map(ord, target)) % 50), 4)


def write_results(run_dir: Path, family: str) -> None:
    """A leave-one-site-out results.csv in the layout ``server.reporting`` writes (metric column by name)."""
    spec = FAMILIES[family]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["target", "method", spec["metric"], "n", "sources", "weights", "min_distance"])
        for t in spec["sites"]:
            for m in METHODS:
                others = [s for s in spec["sites"] if s != t][:2]
                w.writerow(
                    [
                        t,
                        m,
                        f"{score(family, t, m):.4f}",
                        3,
                        "" if m == "base" else ";".join(others),
                        "" if m == "base" else "0.6000;0.4000",
                        "" if m == "base" else "1.5",
                    ]
                )


def build(tmp: Path) -> dict[str, Any]:
    """The root, its two family registries, site a's egress log, compositions and evaluations."""
    rng = np.random.default_rng(11)
    root = tmp / "coordinator"
    egress = EgressLog(tmp / "site-a" / "egress.jsonl", full_records=("meta",))
    out: dict[str, Any] = {"root": root, "egress": egress.path, "dirs": {}, "records": {}, "compositions": {}}
    for family, spec in FAMILIES.items():
        path = root / spec["subdir"] if spec["subdir"] else root
        Registry.init(
            path,
            base_fingerprint=spec["base"],
            module_shapes=spec["shapes"],
            embedding_dim=spec["dim"],
            representation=spec["representation"],
        ).close()
        if spec["subdir"]:
            share_coordinator_key(root, path)
        out["dirs"][family] = path
        centres = {s: rng.standard_normal(spec["dim"]) * 3 for s in spec["sites"]}
        with Registry(path, chroma="off") as reg:
            for i, site in enumerate(spec["sites"]):
                adapter = _adapter(spec["shapes"], seed=10 * len(family) + i)
                z = (centres[site] + 0.2 * rng.standard_normal(spec["dim"])).astype(np.float32)
                meta = AdapterMeta(
                    site=site, task=spec["task"], modality="text", base_fingerprint=spec["base"], sample_count=5 + i
                )
                fields: dict[str, Any] = {}
                reply = None
                run_id = f"{family}-enrol"
                if site == "a":  # as the ClientApp does it: log the reply; the coordinator logs its digests
                    arrays, _ = adapter_to_arrays(adapter)
                    reply = {"adapter": arrays, "embedding": {"z": z}, "meta": {"site": site, "task": spec["task"]}}
                    fields = {
                        "run_id": run_id,
                        "nonce": f"{family}-n",
                        "record_digests": record_digests(reply),
                        "message_type": "train",
                    }
                rec = reg.add(adapter, z, meta, audit_fields=fields)
                if reply is not None:
                    egress.record(
                        "train",
                        reply,
                        run_id=run_id,
                        extra={"outcome": "ok", "nonce": f"{family}-n", "receipt": reg.receipt(rec.id, run_id=run_id)},
                    )
            res = compose_for_target(
                reg,
                centres["b" if family == "report" else "RUNMC"] + 0.1,
                strategy="sim",
                k=2,
                target="t-" + family,
                out_dir=tmp / f"composed-{family}",
            )
            out["compositions"][family] = res
            out["records"][family] = [r.to_dict() for r in reg.list()]
        write_results(path / "evaluations" / f"run-{family}", family)
    return out


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def put(path: Path, text_lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in text_lines))


def tamper_line(path: Path, index: int, old: str, new: str) -> None:
    """Edit line ``index`` (0-based) of a JSONL file in place: the first ``old`` becomes ``new``."""
    text = lines(path)
    assert old in text[index], (old, text[index])
    text[index] = text[index].replace(old, new, 1)
    put(path, text)


def accepted_line(audit: Path, site: str) -> int:
    """0-based index of the site's submission.accepted entry in an audit log."""
    for i, raw in enumerate(lines(audit)):
        e = json.loads(raw)
        if e.get("event") == "submission.accepted" and e.get("site") == site:
            return i
    raise AssertionError(f"no accepted submission of {site} in {audit}")
