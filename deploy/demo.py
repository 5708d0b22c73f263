"""The embedded default main job: a real local federation of hospital sites on this one machine.

What it does, end to end (``python -m deploy.demo``, or ``scripts/demo.sh`` which also sets up):

1. Builds one site per report group from the real data in ``data/`` (IU X-ray chest; MedPix CT
   abdomen, CT head, MR head), each with its own training reports and held-out reports, in
   ``<workdir>/data/<site>/{train,eval}.jsonl``.
2. Starts a real Flower SuperLink and one SuperNode per site on 127.0.0.1 with TLS, SuperNode
   authentication and Ed25519-signed submissions (``deploy.launch.up``).
3. ``enroll``: every site fine-tunes a LoRA on SmolLM2-135M-Instruct and sends only the adapter,
   its mean embedding z and a metadata record; the coordinator validates and stores them in its
   registry (embedded Chroma + blob store + audit log).
4. ``evaluate``: leave-one-site-out. For each site the coordinator asks for z, composes the other
   sites' adapters with every strategy, sends the composed adapter to the site, and the site
   scores it (ROUGE-L) on its held-out reports and replies with metrics only; the base model and
   the site's own LoRA are the references.
5. The same federation also holds the six real prostate MRI sites (RUNMC, BMC, I2CVB, UCL, BIDMC,
   HK; ``prostate-multisite`` from the data root) as segmentation sites on LiteMedSAM: they enrol
   (LoRA on the mask decoder + z = encoder spatial mean + metadata) into the registry's
   segmentation family and run the same leave-one-site-out evaluation, scored by DICE.
   ``--families report`` or ``--families segmentation`` runs only one family.
6. Prints the results tables (with the weights each target received), where the files and plots
   are, the wall time per phase, and stops every process by PID.

Profiles: ``quick`` (default; fits two CPU cores) and ``full`` (more data and steps; for a GPU).
Torch threads per site: the cores this process may use (``os.sched_getaffinity``) divided by the
number of sites that compute at the same time (every site of a family works in parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import launch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SITES = {"xray": "xray-chest", "ct-abdomen": "ct-abdomen", "ct-head": "ct-head", "mr-head": "mr-head"}
SEG_DATASET = "prostate-multisite"
SEG_SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
FAMILIES = ("report", "segmentation")
#: each prostate site holds only 5-6 slices (3 train + 2-3 test), fewer than the release policy's
#: safe defaults (z over >= 10 examples, metrics over >= 10 held-out items): each site's node config
#: loosens them for itself, explicitly, as a hospital would have to (``client/policy.py``)
SEG_RELEASE = {"z-min-examples": 5, "metrics-min-reports": 2}


@dataclass(frozen=True)
class DemoProfile:
    n_train: int
    n_eval: int
    steps: int
    batch_size: int
    max_length: int
    threads: int  # 0: chosen from the cores available (:func:`auto_threads`)
    seg_steps: int = 12
    seg_copies: int = 1
    seg_k: int = 5


PROFILES = {
    "quick": DemoProfile(n_train=48, n_eval=12, steps=30, batch_size=4, max_length=160, threads=0),
    "full": DemoProfile(
        n_train=400, n_eval=50, steps=300, batch_size=8, max_length=256, threads=0, seg_steps=60, seg_copies=3
    ),
}


def auto_threads(concurrent: int) -> int:
    """Torch threads for one site: the cores this process may run on, shared by the sites that
    compute at once (more threads than cores made a training step 3 s -> 38 s here)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, concurrent))


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def relay_progress(runs_dir: Path, prefix: str = "[rpe] ", poll_s: float = 1.0) -> Iterator[None]:
    """Print the ServerApp's lines (progress, one line per result, time left) while a run is in
    flight, from the run logs it writes (``<registry>/runs/<run id>-<mode>.log``), so the demo is
    never silent for minutes."""
    stop = threading.Event()
    offsets = {p: p.stat().st_size for p in runs_dir.glob("*.log")} if runs_dir.is_dir() else {}

    def follow() -> None:
        while True:
            for path in sorted(runs_dir.glob("*.log")) if runs_dir.is_dir() else []:
                with open(path, "rb") as fh:
                    fh.seek(offsets.get(path, 0))
                    chunk = fh.read()
                whole = chunk[: chunk.rfind(b"\n") + 1]
                offsets[path] = offsets.get(path, 0) + len(whole)
                for line in whole.decode("utf-8", "replace").splitlines():
                    _log("  " + line.removeprefix(prefix))
            if stop.wait(poll_s):
                return

    thread = threading.Thread(target=follow, name="relay-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def prepare_sites(root: Path, profile: DemoProfile, sites: dict[str, str], seed: int = 0) -> dict[str, Path]:
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


def seg_specs(profile: DemoProfile, sam_model: str, threads: int) -> list[launch.SiteSpec]:
    """One SuperNode per prostate site; its node config names the data set and site it holds."""
    from common.families.segmentation.data import data_root

    return [
        launch.SiteSpec(
            site,
            str(data_root()),
            sam_model,
            threads=threads,
            release=dict(SEG_RELEASE),
            extra={
                "task": "segmentation",
                "seg-dataset": SEG_DATASET,
                "seg-site": site,
                "seg-copies": profile.seg_copies,
            },
        )
        for site in SEG_SITES
    ]


def _evaluation(run: dict[str, Any]) -> dict[str, Any]:
    """The evaluation a run reported, with the run's own end state (``run_status``/``run_details``)."""
    out = dict(run["report"].get("evaluate", {})) if run else {}
    out["run_status"], out["run_details"] = (run.get("status", "?"), run.get("details", "")) if run else ("?", "")
    return out


def failures(result: dict[str, Any]) -> list[str]:
    """Why a demo result is not a complete main job (empty when it is): an enrolment or evaluation
    run that did not complete, a site that was not enrolled, an evaluation without results, and
    every problem a family reported."""
    out = []
    for family, enr in result.get("enrolments", {}).items():
        if enr.get("run_status") != "finished:completed" or enr.get("report_status") != "completed":
            out.append(
                f"{family}: the enrolment run ended {enr.get('run_status')!r} "
                f"({enr.get('run_details') or 'the ServerApp stopped before it finished'})"
            )
        out += [
            f"{family}: site {site} was not enrolled ({status})"
            for site, status in sorted(enr.get("sites", {}).items())
            if status != "accepted"
        ]
    for family, res in result["families"].items():
        status = res.get("run_status", "finished:completed")
        if status != "finished:completed":
            out.append(f"{family}: the evaluation run ended {status!r} ({res.get('run_details') or 'no details'})")
        elif not res["outputs"].get("markdown") or not res.get("rows", 1):
            out.append(f"{family}: the evaluation produced no results")
        out += [f"{family}: {key}: {problem}" for key, problem in sorted(res["problems"].items())]
    return out


def run_demo(
    workdir: Path,
    profile: DemoProfile,
    model: str = "smollm2-135m-instruct",
    sites: dict[str, str] | None = None,
    families: tuple[str, ...] = FAMILIES,
    sam_model: str = "litemedsam",
) -> dict[str, Any]:
    """Run enrol + evaluate for each family on a fresh local deployment; returns timings and outputs."""
    from common.models import resolve_model_dir

    sites = sites or DEFAULT_SITES if "report" in families else {}
    workdir = workdir.resolve()
    if workdir.exists():
        launch.down(workdir)  # a previous demo that was interrupted
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model_dir = str(resolve_model_dir(model))
    data = prepare_sites(workdir / "data", profile, sites)
    registry = workdir / "registry"
    widest = max(len(sites), len(SEG_SITES) if "segmentation" in families else 0)
    threads = profile.threads or auto_threads(widest)
    _log(
        f"torch threads per site: {threads} ({len(os.sched_getaffinity(0))} cores available, up to {widest} "
        "sites computing at once)"
    )
    specs = [launch.SiteSpec(site, str(path), model_dir, threads=threads) for site, path in data.items()]
    if "segmentation" in families:
        specs += seg_specs(profile, sam_model, threads)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _log(f"starting a SuperLink and {len(specs)} SuperNodes on 127.0.0.1 (TLS + node auth)")
    state = launch.up(workdir / "deploy", specs, port=launch.free_port(), registry=str(registry))
    flwr_home = Path(state["flwr_home"])
    timings["deploy_up_s"] = time.perf_counter() - t_all
    common = {
        "registry-dir": str(registry),
        "require-signatures": True,
        "timeout-train": 3600.0,
        "timeout-query": 900.0,
        "eval-strategies": "sim,lin,lin-l1",
    }
    configs = {
        "report": {
            **common,
            "base-model": model_dir,
            "steps": profile.steps,
            "batch-size": profile.batch_size,
            "max-length": profile.max_length,
            "sites": ",".join(sites),
        },
        "segmentation": {
            **common,
            "base-model": sam_model,
            "task": "segmentation",
            "steps": profile.seg_steps,
            "batch-size": 2,
            "lora-r": 4,
            "lora-alpha": 8.0,
            "lr": 2e-3,
            "k": profile.seg_k,
            "sites": ",".join(SEG_SITES),
        },
    }
    evaluations: dict[str, dict[str, Any]] = {}
    enrolments: dict[str, dict[str, Any]] = {}
    try:
        for family in families:  # enrol every family first: the report registry must exist before the others
            t0 = time.perf_counter()
            _log(
                f"enroll [{family}]: each site trains a LoRA ({configs[family]['steps']} steps) and sends adapter "
                "+ z + metadata"
            )
            with relay_progress(registry / "runs"):
                enroll = launch.run_app(flwr_home, REPO, {**configs[family], "mode": "enroll"}, registry, timeout=3600)
            timings[f"enroll_{family}_s"] = time.perf_counter() - t0
            got = enroll["report"].get("enroll", {})
            for site, res in sorted(got.items()):
                _log(f"  {site}: {res.get('status')} {res.get('record_id', res.get('reason', ''))}")
            enrolments[family] = {
                "run_status": enroll.get("status"),
                "run_details": enroll.get("details", ""),
                "report_status": enroll["report"].get("status"),
                "sites": {
                    site: str(got.get(site, {}).get("status", "no reply"))
                    for site in configs[family]["sites"].split(",")
                    if site
                },
            }
        for family in families:
            t0 = time.perf_counter()
            _log(f"evaluate [{family}]: leave-one-site-out, every strategy + base + own LoRA, scored at the sites")
            config = {k: v for k, v in configs[family].items() if k != "sites"}
            with relay_progress(registry / "runs"):
                evaluations[family] = _evaluation(
                    launch.run_app(flwr_home, REPO, {**config, "mode": "evaluate"}, registry, timeout=3600)
                )
            timings[f"evaluate_{family}_s"] = time.perf_counter() - t0
    finally:
        launch.down(workdir / "deploy")
    timings["total_s"] = time.perf_counter() - t_all
    for phase in ("enroll", "evaluate"):
        timings[f"{phase}_s"] = sum(v for k, v in timings.items() if k.startswith(f"{phase}_") and k != f"{phase}_s")
    first = evaluations.get("report") or next(iter(evaluations.values()), {})
    return {
        "timings": timings,
        "outputs": first.get("outputs", {}),
        "problems": first.get("problems", {}),
        "families": {
            f: {
                "outputs": e.get("outputs", {}),
                "problems": e.get("problems", {}),
                "run_status": e.get("run_status", "?"),
                "run_details": e.get("run_details", ""),
                "rows": len(e.get("rows", [])),
            }
            for f, e in evaluations.items()
        },
        "enrolments": enrolments,
        "registry": str(registry),
        "threads": threads,
        "sites": {s: str(p) for s, p in data.items()},
        "egress": {s.site: str(Path(s.site_dir) / "egress.jsonl") for s in specs},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.demo",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "runs" / "demo",
        help="everything the run writes (default runs/demo; replaced on each run)",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model directory or name")
    parser.add_argument("--sam-model", default="litemedsam", help="SAM-style base model of the segmentation sites")
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help="task families in the federation, comma-separated (default: report,segmentation)",
    )
    args = parser.parse_args(argv)
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    result = run_demo(args.workdir, PROFILES[args.profile], args.model, families=families, sam_model=args.sam_model)
    for family, res in result["families"].items():
        md = res["outputs"].get("markdown")
        print(f"\n## {family} sites\n")
        if md and Path(md).exists():
            print(Path(md).read_text())
            print("plots: " + ", ".join(v for k, v in sorted(res["outputs"].items()) if k.endswith("_plot")))
        for key, problem in sorted(res["problems"].items()):
            print(f"problem: {key}: {problem}")
    t = result["timings"]
    phases = ", ".join(
        f"{k[:-2].replace('_', ' ')} {v / 60:.1f} min"
        for k, v in t.items()
        if k.startswith(("enroll_", "evaluate_")) and k not in ("enroll_s", "evaluate_s")
    )
    print(
        f"\nwall time {t['total_s'] / 60:.1f} min (deployment {t['deploy_up_s']:.0f} s, {phases}; "
        f"{result['threads']} torch thread(s) per site)"
    )
    print(f"registry + audit log: {result['registry']} (segmentation family: {result['registry']}/segmentation)")
    print("egress logs: " + ", ".join(result["egress"].values()))
    failed = failures(result)
    if failed:
        print(
            "\nThe main job did NOT complete:\n"
            + "\n".join(f"  - {x}" for x in failed)
            + f"\nLogs: {args.workdir.resolve()}/deploy/logs/ and {result['registry']}/runs/; run it again "
            "(every run starts from a fresh deployment).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
