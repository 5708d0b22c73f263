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
5. Prints the results table, where its files are, and stops every process by PID.

Profiles: ``quick`` (default; fits two CPU cores) and ``full`` (more data and steps; for a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
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


@dataclass(frozen=True)
class DemoProfile:
    n_train: int
    n_eval: int
    steps: int
    batch_size: int
    max_length: int
    threads: int


PROFILES = {
    "quick": DemoProfile(n_train=48, n_eval=12, steps=30, batch_size=4, max_length=160, threads=1),
    "full": DemoProfile(n_train=400, n_eval=50, steps=300, batch_size=8, max_length=256, threads=0),
}


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
    from common.data import report_groups, split, write_jsonl

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


def run_demo(workdir: Path, profile: DemoProfile, model: str = "smollm2-135m-instruct",
             sites: dict[str, str] | None = None) -> dict[str, Any]:
    """Run enrol + evaluate on a fresh local deployment; returns timings and the output paths."""
    from common.models import resolve_model_dir

    sites = sites or DEFAULT_SITES
    workdir = workdir.resolve()
    if workdir.exists():
        launch.down(workdir)  # a previous demo that was interrupted
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model_dir = str(resolve_model_dir(model))
    data = prepare_sites(workdir / "data", profile, sites)
    registry = workdir / "registry"
    specs = [launch.SiteSpec(site, str(path), model_dir, threads=profile.threads) for site, path in data.items()]
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _log(f"starting a SuperLink and {len(specs)} SuperNodes on 127.0.0.1 (TLS + node auth)")
    state = launch.up(workdir / "deploy", specs, port=launch.free_port(), registry=str(registry))
    flwr_home = Path(state["flwr_home"])
    timings["deploy_up_s"] = time.perf_counter() - t_all
    common = {"registry-dir": str(registry), "base-model": model_dir, "steps": profile.steps,
              "batch-size": profile.batch_size, "max-length": profile.max_length, "require-signatures": True,
              "timeout-train": 3600.0, "timeout-query": 900.0}
    try:
        t0 = time.perf_counter()
        _log(f"enroll: each site trains a LoRA ({profile.steps} steps) and sends adapter + z + metadata")
        with relay_progress(registry / "runs"):
            enroll = launch.run_app(flwr_home, REPO, {**common, "mode": "enroll"}, registry, timeout=3600)
        timings["enroll_s"] = time.perf_counter() - t0
        outcome = enroll["report"].get("enroll", {})
        for site, res in sorted(outcome.items()):
            _log(f"  {site}: {res.get('status')} {res.get('record_id', res.get('reason', ''))}")
        t0 = time.perf_counter()
        _log("evaluate: leave-one-site-out, every strategy + base + own LoRA, scored at the sites")
        with relay_progress(registry / "runs"):
            evaluate = launch.run_app(flwr_home, REPO, {**common, "mode": "evaluate",
                                                        "eval-strategies": "sim,lin,lin-l1"}, registry, timeout=3600)
        timings["evaluate_s"] = time.perf_counter() - t0
    finally:
        launch.down(workdir / "deploy")
    timings["total_s"] = time.perf_counter() - t_all
    outputs = evaluate["report"].get("evaluate", {}).get("outputs", {})
    problems = evaluate["report"].get("evaluate", {}).get("problems", {})
    return {"timings": timings, "outputs": outputs, "problems": problems, "registry": str(registry),
            "sites": {s: str(p) for s, p in data.items()}, "egress": {
                s.site: str(Path(s.site_dir) / "egress.jsonl") for s in specs}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo",
                        help="everything the run writes (default runs/demo; replaced on each run)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model directory or name")
    args = parser.parse_args(argv)
    result = run_demo(args.workdir, PROFILES[args.profile], args.model)
    md = result["outputs"].get("markdown")
    if md and Path(md).exists():
        print(Path(md).read_text())
    for key, problem in sorted(result["problems"].items()):
        print(f"problem: {key}: {problem}")
    t = result["timings"]
    print(f"\nwall time {t['total_s'] / 60:.1f} min (deployment {t['deploy_up_s']:.0f} s, "
          f"enroll {t['enroll_s'] / 60:.1f} min, evaluate {t['evaluate_s'] / 60:.1f} min)")
    print(f"registry + audit log: {result['registry']}; results: {Path(md).parent if md else '-'}")
    print("egress logs: " + ", ".join(result["egress"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
