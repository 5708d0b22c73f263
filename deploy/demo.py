"""The embedded default main job: a real local federation of hospital sites on this one machine.

What it does, end to end (``python -m deploy.demo``, or ``scripts/demo.sh`` which also sets up):

1. Asks every task family with a demo recipe (``Family.demo``) for its sites: the report family
   writes one site per report group of the real data (IU X-ray chest; MedPix CT abdomen, CT head,
   MR head) to ``<workdir>/data/report-text/<site>/{train,eval}.jsonl``; the segmentation family
   names the six real prostate MRI sites (``prostate-multisite`` from the data root) on LiteMedSAM.
2. Starts a real Flower SuperLink and one SuperNode per site on 127.0.0.1 with TLS, SuperNode
   authentication and Ed25519-signed submissions (``deploy.launch.up``).
3. ``enroll``, family by family: every site fine-tunes a LoRA on its family's base model and sends
   only the adapter, its mean embedding z and a metadata record; the coordinator validates and
   stores them in the family's registry under the registry root (embedded Chroma + blob store +
   audit log).
4. ``evaluate``, family by family: leave-one-site-out. For each site the coordinator asks for z,
   composes the other sites' adapters with every strategy, sends them to the site, and the site
   scores them on its held-out data by the family's metric (ROUGE-L, DICE) and replies with
   metrics only; the base model and the site's own LoRA are the references.
5. ``deliver``, family by family: one ``compose`` run delivers a composition to the family's
   target site (the report family: a new site with unlabelled CT thorax findings; the
   segmentation family: HK, from the other five sites), which installs it as
   ``<site-dir>/adapters/<name>/``; the demo prints the ``rpe generate`` / ``rpe segment`` command
   that tries it there (also written to ``<workdir>/try-delivery.sh``).
6. ``--families report`` (a family's name or a unique start of it) runs only that family;
   ``--model [FAMILY=]MODEL`` names another base model; ``--no-evaluate`` enrols and delivers only.
7. Prints the results tables (with the weights each target received), where the files and plots
   are, the wall time per phase, and stops every process by PID.

The workdir (default ``runs/demo``): a second demo on the same workdir while one runs is refused
(a lock beside it, ``.<name>.lock``, names the holder's pid); the previous run's folder is kept as
``<workdir>.1`` (ONE generation: the one before it is deleted) unless ``--fresh`` (deleted). A
folder that is not a demo's is never deleted or moved.

Profiles: ``quick`` (default; fits two CPU cores) and ``full`` (more data and steps; for a GPU).
Torch threads per site: the cores this process may use (``os.sched_getaffinity``) divided by the
number of sites that compute at the same time (every site of a family works in parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy import launch

REPO = Path(__file__).resolve().parent.parent
#: demo profiles: ``quick`` (default; fits two CPU cores) and ``full`` (more data and steps; a GPU);
#: each family's recipe says what they mean for it
PROFILES = ("quick", "full")


def demo_families() -> list[str]:
    """The task families that bring a demo recipe (``Family.demo``), in table order."""
    from common.families import family_names, get_family

    return [name for name in family_names() if get_family(name).demo]


def pick_families(spec: str) -> tuple[str, ...]:
    """``--families``: comma-separated family names, each a name or a unique start of one
    (``report`` for ``report-text``). ``ValueError`` names what is unknown and what exists."""
    known = demo_families()
    out = []
    for raw in (x.strip() for x in spec.split(",")):
        if not raw:
            continue
        hits = [raw] if raw in known else [k for k in known if k.startswith(raw)]
        if len(hits) != 1:
            raise ValueError(f"unknown or ambiguous family {raw!r}; choose from {', '.join(known)}")
        out.append(hits[0])
    if not out:
        raise ValueError(f"no family named; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(out))


def _plan(name: str, workdir: Path, profile: str, model: str | None) -> Any:
    """The family's demo plan (its recipe, imported on first use)."""
    import importlib

    from common.families import get_family

    family = get_family(name)
    module, _, attr = family.demo.partition(":")
    return getattr(importlib.import_module(module), attr)(workdir, profile, model or family.default_model)


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


def _evaluation(run: dict[str, Any]) -> dict[str, Any]:
    """The evaluation a run reported, with the run's own end state (``run_status``/``run_details``)."""
    out = dict(run["report"].get("evaluate", {})) if run else {}
    out["run_status"], out["run_details"] = (run.get("status", "?"), run.get("details", "")) if run else ("?", "")
    return out


def failures(result: dict[str, Any]) -> list[str]:
    """Why a demo result is not a complete main job (empty when it is): an enrolment, evaluation or
    delivery run that did not complete, a site that was not enrolled, an evaluation without results,
    every problem a family reported, and a target that received nothing."""
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
    for family, dlv in result.get("deliveries", {}).items():
        if dlv.get("run_status") != "finished:completed":
            out.append(
                f"{family}: the delivery run ended {dlv.get('run_status')!r} ({dlv.get('run_details') or 'no details'})"
            )
        elif dlv.get("status") != "delivered":
            reason = f": {dlv['reason']}" if dlv.get("reason") else ""
            out.append(f"{family}: nothing was delivered to {dlv.get('target')} ({dlv.get('status')}{reason})")
    return out


class DemoWorkdirError(RuntimeError):
    """The workdir cannot be used: another demo holds it, or it is not a demo's folder."""


#: a file the demo writes into its workdir: only a folder holding it (or the layout of a demo from
#: before it existed) is ever moved aside or deleted
MARKER = ".rpe-demo"
_LEGACY_LAYOUT = ("data", "deploy", "registry")


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[Path]:
    """Hold the workdir's lock, BESIDE it (``runs/.demo.lock``: it outlives the folder's rotation);
    ``flock``, so the kernel releases it when this process ends, however it ends;
    ``DemoWorkdirError`` names the pid of the demo that holds it."""
    path = Path(workdir).resolve().with_name(f".{Path(workdir).resolve().name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise DemoWorkdirError(
                f"another demo (pid {holder}) is running in {Path(workdir).resolve()} (it holds {path}); "
                f"wait for it to end, stop it (kill {holder}), or give this one another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def is_demo_workdir(path: Path) -> bool:
    """Whether ``path`` is a demo's folder (its marker, or an older demo's data/deploy/registry)."""
    return (path / MARKER).is_file() or all((path / name).is_dir() for name in _LEGACY_LAYOUT)


def set_aside(workdir: Path, fresh: bool = False) -> Path | None:
    """Make room for a new run in ``workdir`` (call it holding :func:`workdir_lock`): stop an
    interrupted run's processes, then keep the previous run as ``<workdir>.1`` (replacing the one
    kept before) or, with ``fresh``, delete it. Returns where the previous run went (None: nothing
    kept). A non-empty folder that is not a demo's is refused, untouched."""
    workdir = Path(workdir).resolve()
    if not workdir.exists():
        return None
    if workdir.is_dir() and not any(workdir.iterdir()):
        workdir.rmdir()
        return None
    if not workdir.is_dir() or not is_demo_workdir(workdir):
        raise DemoWorkdirError(
            f"--workdir {workdir} is not empty and is not a demo's folder (no {MARKER}); the demo moves or "
            "deletes its workdir's previous run, so it refuses this one: name a new or empty folder"
        )
    launch.down(workdir / "deploy")  # a previous demo that was interrupted (its processes, by PID)
    if fresh:
        shutil.rmtree(workdir)
        return None
    previous = workdir.with_name(workdir.name + ".1")
    if previous.exists():
        if not is_demo_workdir(previous):
            raise DemoWorkdirError(
                f"{previous} (where the demo keeps the previous run) is not a demo's folder; move it away, "
                "or run with --fresh to delete the previous run instead"
            )
        shutil.rmtree(previous)
    workdir.rename(previous)
    return previous


def shown(path: str | Path) -> str:
    """A path as a person would type it here: relative to the current folder when under it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def rpe_command() -> str:
    """How to call ``rpe``: the one beside this Python (the demo's .venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("rpe")
    return shown(beside) if beside.exists() else "rpe"


def try_command(argv: tuple[str, ...], adapter: Path, out: Path) -> str:
    """The shell command (one line) that tries a delivered adapter: ``rpe`` + the plan's ``try_argv``."""
    words = [a.format(adapter=shown(adapter), out=shown(out)) for a in argv]
    return shlex.join([rpe_command(), *words])


def _delivery(plan: Any, family: str, run: dict[str, Any], site_dirs: dict[str, str], workdir: Path) -> dict[str, Any]:
    """What the delivery run did for the family's target, and the command to try it."""
    target = plan.target.site
    got = run.get("report", {}).get("compose", {}).get(target, {}) if run else {}
    out: dict[str, Any] = {
        "target": target,
        "run_status": run.get("status", "?") if run else "?",
        "run_details": run.get("details", "") if run else "",
        "status": got.get("status", "no result"),
        "reason": got.get("reason", ""),
        "sites": got.get("sites", []),
        "weights": got.get("weights", []),
        "metrics": got.get("metrics", {}),
    }
    if got.get("status") == "delivered":
        adapter = Path(site_dirs[target]) / "adapters" / got["adapter_name"]
        out["adapter"] = str(adapter)
        if plan.try_argv:
            out["try"] = try_command(plan.try_argv, adapter, workdir / "try" / family)
    return out


def run_demo(
    workdir: Path,
    profile: str = "quick",
    models: dict[str, str] | None = None,
    families: tuple[str, ...] | None = None,
    evaluate: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run enrol + evaluate + deliver for each family on a fresh local deployment; returns timings
    and outputs. ``models``: a base model per family (default: the family's own). Holds the workdir's
    lock throughout; the previous run is kept as ``<workdir>.1`` unless ``fresh``
    (:func:`set_aside`); ``DemoWorkdirError`` when the workdir cannot be used (nothing changed)."""
    workdir = Path(workdir).resolve()
    with workdir_lock(workdir):
        previous = set_aside(workdir, fresh)
        if previous:
            _log(f"the previous run is kept in {shown(previous)} (one generation; --fresh deletes it instead)")
        workdir.mkdir(parents=True)
        (workdir / MARKER).write_text(f"a folder of python -m deploy.demo (pid {os.getpid()})\n")
        return _run(workdir, profile, models or {}, tuple(families or demo_families()), evaluate)


def _run(
    workdir: Path, profile: str, models: dict[str, str], families: tuple[str, ...], evaluate: bool
) -> dict[str, Any]:
    from common.families import family_registry_dir
    from common.models import cpu_has_native_bf16

    plans = {f: _plan(f, workdir / "data" / f, profile, models.get(f)) for f in families}
    registry = workdir / "registry"
    widest = max(len(p.sites) for p in plans.values())
    threads = auto_threads(widest)
    _log(
        f"torch threads per site: {threads} ({len(os.sched_getaffinity(0))} cores available, up to {widest} "
        "sites computing at once)"
    )
    if not cpu_has_native_bf16():
        _log(
            "this CPU has no bf16 instructions (AVX512-BF16/AMX): the report sites train and generate in "
            "float32, and the report phases take about twice as long as on one that has them"
        )
    specs = [
        launch.SiteSpec(
            d.site,
            d.data_path,
            plan.model,
            threads=threads,
            release=dict(d.release),
            extra={"task": family, **d.node_config},
        )
        for family, plan in plans.items()
        for d in plan.sites
    ]
    enrolled = {spec.site for spec in specs}
    specs += [  # a target that is a new site: a SuperNode of its own that enrols nothing
        launch.SiteSpec(
            plan.target.site,
            plan.target.data_path,
            plan.model,
            threads=threads,
            release=dict(plan.target.release),
            extra={"task": family, **plan.target.node_config},
        )
        for family, plan in plans.items()
        if plan.target is not None and plan.target.site not in enrolled
    ]
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    _log(f"starting a SuperLink and {len(specs)} SuperNodes on 127.0.0.1 (TLS + node auth)")
    try:
        state = launch.up(workdir / "deploy", specs, port=launch.free_port(), registry=str(registry))
    except BaseException:
        launch.down(workdir / "deploy")  # whatever of it started
        raise
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
        f: {**common, **plan.run_config, "task": f, "sites": ",".join(d.site for d in plan.sites)}
        for f, plan in plans.items()
    }
    evaluations: dict[str, dict[str, Any]] = {}
    enrolments: dict[str, dict[str, Any]] = {}
    deliveries: dict[str, dict[str, Any]] = {}
    try:
        for family in families:  # enrol every family first: the root registry must exist before the others
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
        for family in families if evaluate else ():
            t0 = time.perf_counter()
            _log(f"evaluate [{family}]: leave-one-site-out, every strategy + base + own LoRA, scored at the sites")
            config = {k: v for k, v in configs[family].items() if k != "sites"}
            with relay_progress(registry / "runs"):
                evaluations[family] = _evaluation(
                    launch.run_app(flwr_home, REPO, {**config, "mode": "evaluate"}, registry, timeout=3600)
                )
            timings[f"evaluate_{family}_s"] = time.perf_counter() - t0
        site_dirs = {spec.site: spec.site_dir for spec in specs}
        for family in families:
            plan = plans[family]
            if plan.target is None:
                continue
            t0 = time.perf_counter()
            _log(f"deliver [{family}]: a composition of the enrolled sites' adapters for {plan.target.site}")
            config = {k: v for k, v in configs[family].items() if k != "sites"}
            with relay_progress(registry / "runs"):
                run = launch.run_app(
                    flwr_home, REPO, {**config, "mode": "compose", "target": plan.target.site}, registry, timeout=3600
                )
            deliveries[family] = _delivery(plan, family, run, site_dirs, workdir)
            timings[f"deliver_{family}_s"] = time.perf_counter() - t0
    finally:
        launch.down(workdir / "deploy")
    timings["total_s"] = time.perf_counter() - t_all
    for phase in ("enroll", "evaluate", "deliver"):
        timings[f"{phase}_s"] = sum(v for k, v in timings.items() if k.startswith(f"{phase}_") and k != f"{phase}_s")
    first = next(iter(evaluations.values()), {})
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
        "deliveries": deliveries,
        "workdir": str(workdir),
        "registry": str(registry),
        "registries": {f: str(family_registry_dir(registry, f)) for f in families},
        "threads": threads,
        "sites": {d.site: d.data_path for plan in plans.values() for d in plan.sites},
        "egress": {s.site: str(Path(s.site_dir) / "egress.jsonl") for s in specs},
    }


def parse_models(values: list[str], families: tuple[str, ...]) -> dict[str, str]:
    """``--model``: ``FAMILY=MODEL`` per family; a bare ``MODEL`` is the first family's."""
    out = {}
    for value in values:
        name, sep, model = value.partition("=")
        if not sep:
            name, model = families[0], value
        out[pick_families(name)[0] if sep else name] = model
    return out


def print_deliveries(result: dict[str, Any]) -> None:
    """What each target received and the command that tries it there (also ``<workdir>/try-delivery.sh``)."""
    tries = []
    for family, dlv in result.get("deliveries", {}).items():
        if dlv.get("status") != "delivered":
            continue
        parts = ", ".join(f"{site} {w:.2f}" for site, w in zip(dlv["sites"], dlv["weights"], strict=False))
        scored = ", ".join(f"{k} {v:.4f}" for k, v in sorted(dlv.get("metrics", {}).items()))
        print(
            f"\ndelivered [{family}]: {dlv['target']} received a composition of {parts or 'the enrolled sites'}"
            + (f" (scored at the site on its held-out data: {scored})" if scored else "")
            + f"\n  installed in {shown(dlv['adapter'])}"
        )
        if dlv.get("try"):
            tries.append(dlv["try"])
    if not tries:
        return
    script = Path(result["workdir"]) / "try-delivery.sh"
    script.write_text(
        "#!/usr/bin/env bash\n# the delivered adapters, tried at their target sites\nset -e\n"
        f"cd {shlex.quote(str(Path.cwd()))}\n" + "".join(f"{c}\n" for c in tries)
    )
    print("\nTry the delivered adapters at their target sites (or: bash " + shown(script) + "):")
    for cmd in tries:
        print(f"  {cmd}")


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
        help="everything the run writes (default runs/demo); the previous run there is kept as <workdir>.1 "
        "(one generation) unless --fresh",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the previous run in --workdir instead of keeping it as <workdir>.1"
    )
    parser.add_argument(
        "--no-evaluate",
        dest="evaluate",
        action="store_false",
        help="enrol and deliver only: skip the leave-one-site-out evaluation (no results tables)",
    )
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[FAMILY=]MODEL",
        help="base model of a family's sites (repeatable; a bare MODEL is the first family's; default: "
        "each family's own)",
    )
    parser.add_argument(
        "--families",
        default=",".join(demo_families()),
        help=f"task families in the federation, comma-separated (default: {','.join(demo_families())})",
    )
    args = parser.parse_args(argv)
    try:
        families = pick_families(args.families)
        models = parse_models(args.model, families)
    except ValueError as exc:
        parser.error(f"--families/--model: {exc}")
    try:
        result = run_demo(args.workdir, args.profile, models, families, evaluate=args.evaluate, fresh=args.fresh)
    except DemoWorkdirError as exc:
        print(f"[demo] {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:  # launch.LaunchError, a flwr call's timeout
        work = args.workdir.resolve()
        print(
            f"[demo] the main job stopped: {exc}\nEvery process it started was stopped. Logs: {work}/deploy/logs/ "
            f"and {work}/registry/runs/; run it again (this run is then kept as {work.name}.1).",
            file=sys.stderr,
        )
        return 1
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
        if k.startswith(("enroll_", "evaluate_", "deliver_")) and k not in ("enroll_s", "evaluate_s", "deliver_s")
    )
    print(
        f"\nwall time {t['total_s'] / 60:.1f} min (deployment {t['deploy_up_s']:.0f} s, {phases}; "
        f"{result['threads']} torch thread(s) per site)"
    )
    print(
        f"registry + audit log: {result['registry']} ("
        + ", ".join(f"{f}: {path}" for f, path in result["registries"].items())
        + ")"
    )
    print("egress logs: " + ", ".join(result["egress"].values()))
    print_deliveries(result)
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
