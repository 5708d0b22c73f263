"""What a run leaves behind for people: the run report, the evaluation tables and plots, progress lines.

``write_report`` writes ``<registry>/runs/<run id>-<mode>.json`` (what operators and tests read);
``write_evaluation`` the leave-one-site-out ``results.csv``, ``results.md`` and three plots;
:class:`Progress` prints one line per result as it arrives, with an estimate of the time left, and
a line at least every ``heartbeat_s`` while nothing arrives (``flwr run --stream`` and
``deploy/demo.py`` show these lines).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from server.messaging import log


class Progress:
    """``[i/n] <what>: <result> (elapsed, ~left)`` per result; a waiting line when it goes quiet.

    The estimate is the mean time per result so far times the results still to come: results of
    one site arrive one after another (a SuperNode handles one message at a time), so this is a
    fair guess after the first one, and it says "estimating" before.
    """

    def __init__(
        self,
        phase: str,
        total: int,
        heartbeat_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] = log,
    ) -> None:
        self.phase, self.total, self.heartbeat_s = phase, total, heartbeat_s
        self.clock, self.emit = clock, emit
        self.done = 0
        self.started = self.last = clock()

    def eta(self) -> float | None:
        """Seconds left (None before the first result)."""
        if self.done == 0:
            return None
        return (self.clock() - self.started) / self.done * max(0, self.total - self.done)

    def _times(self) -> str:
        elapsed = self.clock() - self.started
        left = self.eta()
        est = "estimating time left" if left is None else f"about {_duration(left)} left"
        return f"{_duration(elapsed)} elapsed, {est}"

    def result(self, what: str, outcome: str) -> None:
        """One result arrived."""
        self.done += 1
        self.last = self.clock()
        self.emit(f"{self.phase} [{self.done}/{self.total}] {what}: {outcome} ({self._times()})")

    def waiting(self) -> None:
        """Called on every poll: prints only when nothing was printed for ``heartbeat_s``."""
        if self.done >= self.total or self.clock() - self.last < self.heartbeat_s:
            return
        self.last = self.clock()
        self.emit(f"{self.phase}: waiting for the sites, {self.done}/{self.total} results in ({self._times()})")


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def metric_title(metric: str) -> str:
    """How a table heads ``metric``: the title of the family that scores by it (``Family.metric_title``),
    else the metric's own name."""
    from common.families import family_names, get_family

    for name in family_names():
        family = get_family(name)
        if family.metric == metric:
            return family.metric_title
    return metric


def evaluation_row(info: Mapping[str, Any], metrics: Mapping[str, float], metric: str) -> dict[str, Any]:
    """One (target, method) row of the evaluation table; ``score`` is the family's ``metric``
    (``Family.metric``), also kept under its own name."""
    return {
        "target": info["target"],
        "method": info["method"],
        metric: metrics.get(metric),
        "metric": metric,
        "score": metrics.get(metric),
        "n": int(metrics.get("n", 0)),
        "sources": list(info.get("sites", [])),
        "weights": [round(float(w), 6) for w in info.get("weights", [])],
        "distances": [float(d) for d in info.get("distances", [])],
        "metrics": dict(metrics),
        "nearness": info.get("nearness") or None,
        "normalisation": info.get("normalisation") or None,
    }


def write_evaluation(
    out_dir: Path,
    rows: list[dict[str, Any]],
    registry: Any,
    zs: Mapping[str, np.ndarray],
    identical: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, str]:
    """results.csv, results.md and three plots (weights, site distances, score vs distance);
    ``identical`` (``{target: {"a|b": share}}``) adds the identical-output table to results.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # rows made before the score column (the first family's metric only) read as that family's rows
    from common.families import DEFAULT_FAMILY, get_family

    legacy = get_family(DEFAULT_FAMILY).metric
    rows = [{**r, "metric": r.get("metric") or legacy, "score": r.get("score", r.get(legacy))} for r in rows]
    csv_path = out_dir / "results.csv"
    metric = next((r["metric"] for r in rows if r.get("metric")), legacy)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["target", "method", metric, "n", "sources", "weights", "min_distance"])
        for r in rows:
            writer.writerow(
                [
                    r["target"],
                    r["method"],
                    "" if r["score"] is None else f"{r['score']:.4f}",
                    r["n"],
                    ";".join(r["sources"]),
                    ";".join(f"{w:.4f}" for w in r["weights"]),
                    f"{min(r['distances']):.6g}" if r["distances"] else "",
                ]
            )
    targets = sorted({r["target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["target"], r["method"]): r["score"] for r in rows}
    lines = [
        f"# Leave-one-site-out evaluation ({metric_title(metric)})",
        "",
        "| target | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for t in targets:
        cells = [f"{table[(t, m)]:.4f}" if table.get((t, m)) is not None else "-" for m in methods]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    means = []
    for m in methods:
        vals = [table[(t, m)] for t in targets if table.get((t, m)) is not None]
        means.append(f"{np.mean(vals):.4f}" if vals else "-")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    lines += [
        "",
        "`own` is the target site's own LoRA (supervised reference, not zero-shot); `base` the base "
        "model without adapter; all other columns compose adapters of the *other* sites only.",
        "",
    ]
    lines += weights_lines(rows)
    lines += nearness_lines(rows)
    lines += identical_lines(identical or {})
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    out = {"csv": str(csv_path), "markdown": str(md_path)}
    try:
        out.update(_plots(out_dir, rows, registry, zs))
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the tables are the result
        log(f"plots failed: {type(exc).__name__}: {exc}")
    return out


def weights_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The weights each target received, per composed arm (the paper's Table 4), as Markdown."""
    composed = [r for r in rows if r["weights"] and r["method"] not in ("own", "base")]
    if not composed:
        return []
    out = ["## Weights per target", "", "| target | arm | weights (source: w) |", "|---|---|---|"]
    for r in composed:
        pairs = ", ".join(f"{s}: {w:+.3f}" for s, w in zip(r["sources"], r["weights"], strict=False))
        norm = r.get("normalisation") or {}
        if norm.get("scales"):  # update-norm (common/adapters/normalise.py): the composition is Σ w_i c_i δ_i
            pairs += f"; update-norm {norm['mode']}, scales c: " + ", ".join(f"{c:.3g}" for c in norm["scales"])
        out.append(f"| {r['target']} | {r['method']} | {pairs} |")
    return [*out, ""]


def nearness_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per target, the "nothing close enough" check of its composed arms (``server/nearness.py``):
    one line per target, since every arm retrieves from the same library."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("nearness") and r["method"] not in ("own", "base"):
            seen.setdefault(r["target"], r["nearness"])
    if not seen:
        return []
    out = [
        "## How close the library was",
        "",
        "ratio = squared z distance to the nearest library adapter / the library's median "
        'nearest-neighbour spacing; above `far-ratio` the coordinator warns "nothing close enough".',
        "",
        "| target | ratio | far-ratio | warning |",
        "|---|---|---|---|",
    ]
    for t, c in sorted(seen.items()):
        ratio = "–" if c.get("ratio") is None else f"{c['ratio']:.2f}"
        out.append(f"| {t} | {ratio} | {c.get('threshold', 0):g} | {c.get('warning') or c.get('reason') or '–'} |")
    return [*out, ""]


def identical_lines(identical: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The share of held-out items on which two arms produced identical output, per target (the
    pairs with a share above zero; the site counts it, the outputs never leave it)."""
    if not any(identical.values()):
        return []
    out = [
        "## Identical outputs",
        "",
        "Share of the held-out items on which two arms produced exactly the same output (text, or "
        "mask); equal scores with a share of 1.00 are one output, not a coincidence. Pairs not listed: 0.",
        "",
        "| target | arms | identical |",
        "|---|---|---|",
    ]
    for t in sorted(identical):
        for pair, share in sorted(identical[t].items(), key=lambda kv: (-kv[1], kv[0])):
            if share > 0:
                a, _, b = pair.partition("|")
                out.append(f"| {t} | `{a}` = `{b}` | {share:.2f} |")
    return [*out, ""]


def _plots(out_dir: Path, rows: list[dict[str, Any]], registry: Any, zs: Mapping[str, np.ndarray]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    composed = [r for r in rows if r["weights"] and r["method"] not in ("own", "base")]
    targets = sorted({r["target"] for r in composed})
    if targets:
        fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 3.5), squeeze=False)
        for ax, t in zip(axes[0], targets, strict=True):
            sub = [r for r in composed if r["target"] == t]
            sources = sorted({s for r in sub for s in r["sources"]})
            width = 0.8 / max(1, len(sub))
            for i, r in enumerate(sub):
                w = dict(zip(r["sources"], r["weights"], strict=False))
                ax.bar(
                    np.arange(len(sources)) + i * width, [w.get(src, 0.0) for src in sources], width, label=r["method"]
                )
            ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2, sources)
            ax.set_title(f"target {t}")
            ax.axhline(0, color="k", linewidth=0.5)
        axes[0][0].set_ylabel("weight")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "weights.png", dpi=120)
        plt.close(fig)
        out["weights_plot"] = str(out_dir / "weights.png")
    site_z: dict[str, np.ndarray] = {}
    for rec in registry.list():
        site_z.setdefault(rec.meta.site, rec.z)
    for t, z in zs.items():
        site_z[f"{t} (target)"] = z
    names = sorted(site_z)
    if names:
        Z = np.stack([site_z[n] for n in names]).astype(np.float64)
        D = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)))
        im = ax.imshow(D, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=ax, label="squared L2 distance of z")
        fig.tight_layout()
        fig.savefig(out_dir / "site_distances.png", dpi=120)
        plt.close(fig)
        out["distance_plot"] = str(out_dir / "site_distances.png")
    scored = [r for r in rows if r["distances"] and r["score"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in dict.fromkeys(r["method"] for r in scored):
            sub = [r for r in scored if r["method"] == method]
            ax.scatter(
                [float(np.dot(r["weights"], r["distances"])) if r["weights"] else min(r["distances"]) for r in sub],
                [r["score"] for r in sub],
                label=method,
            )
        ax.set_xlabel("weighted squared distance of the sources to the target")
        ax.set_ylabel(metric_title(scored[0]["metric"]))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "score_vs_distance.png", dpi=120)
        plt.close(fig)
        out["score_plot"] = str(out_dir / "score_vs_distance.png")
    return out


def write_report(registry_dir: str, report: dict[str, Any]) -> Path | None:
    """``<registry>/runs/<run id>-<mode>.json`` (atomic): what the operator and tests read."""
    if not registry_dir:
        return None
    runs = Path(registry_dir).expanduser() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{report['run_id']}-{report['mode']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
