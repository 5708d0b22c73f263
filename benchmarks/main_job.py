"""The main job's wall time, phase by phase, against a baseline commit run in the same script.

``python -m benchmarks.main_job --baseline REF`` runs the embedded default main job (``python -m
deploy.demo``, the quick profile: real SuperLink + SuperNodes on loopback with TLS and node auth,
SmolLM2-135M report sites, LiteMedSAM prostate sites) once from a ``git worktree`` of ``REF`` and
once from this checkout, for each family set of ``--sets`` (default: the report federation alone,
then the whole main job), alternating baseline and current run by run. Each run is a fresh
``deploy.demo`` process in a fresh workdir; only the site data preparation before the clock starts
is shared code.

Per run it records:

- the phases, from the demo's own progress lines (each stamped here as it arrives): deployment,
  then enrolment and evaluation per family, and the total (``wall time``);
- the CPU time used meanwhile by each kind of process (SuperLink, SuperNodes, their SuperExecs,
  ClientApps, the ServerApp, flwr CLI calls), sampled from ``/proc`` once a second: it shows where
  the machine's two cores went, not only how long things took;
- the mean row of each family's leave-one-site-out table (ROUGE-L, DICE), so a faster run that
  scores differently is visible.

Writes ``benchmarks/MAIN_JOB.md`` and ``MAIN_JOB.json`` (``--out``). Goals (issue 14): the report
federation within 5 min, the whole main job within 10 min, on the idle 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.util import ROOT, load_average, log, machine_info, table, write_json

#: the demo's progress lines that start a phase (the same in earlier commits)
# family names have hyphens ("report-text"); the demo ends with a delivery phase per family
PHASE_RE = re.compile(r"^\[demo\] (enroll|evaluate|deliver) \[([\w-]+)\]")
START_RE = re.compile(r"^\[demo\] starting a SuperLink")
END_RE = re.compile(r"^wall time ")
MEAN_RE = re.compile(r"^\| \*\*mean\*\* \|(.*)\|\s*$")
HEADER_RE = re.compile(r"^\| target \|(.*)\|\s*$")
GOALS_S = {"report": 300.0, "report,segmentation": 600.0}


def classify(cmd: str) -> str | None:
    """Which part of the federation a process is, from its command line (None: not ours)."""
    for needle, name in (
        ("flwr-clientapp", "ClientApps"),
        ("superlink_main", "SuperLink"),
        ("flower-superlink", "SuperLink"),
        ("supernode_main", "SuperNodes"),
        ("flower-supernode", "SuperNodes"),
        ("flwr-serverapp", "ServerApp"),
        ("flower-superexec", "SuperExecs"),
        ("deploy.demo", "demo"),
        ("bin/flwr", "flwr CLI"),
    ):
        if needle in cmd:
            return name
    return None


class CpuSampler:
    """CPU seconds per process class, from /proc every ``period`` seconds, while running."""

    def __init__(self, period: float = 1.0) -> None:
        self.period, self.hz = period, os.sysconf("SC_CLK_TCK")
        self.seen: dict[int, tuple[str, float]] = {}
        self.by_class: dict[str, float] = {}
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            cls = classify(cmd)
            if cls is not None:
                fields = stat[stat.rfind(")") + 2 :].split()
                out[int(pid)] = (cls, (int(fields[11]) + int(fields[12])) / self.hz)
        return out

    @staticmethod
    def _idle() -> tuple[int, int]:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]

    def _run(self) -> None:
        total0, idle0 = self._idle()
        while not self._stop.wait(self.period):
            for pid, (cls, cpu) in self._snapshot().items():
                before = self.seen.get(pid, (cls, 0.0))[1]
                self.by_class[cls] = self.by_class.get(cls, 0.0) + max(0.0, cpu - before)
                self.seen[pid] = (cls, cpu)
            total, idle = self._idle()
            if total > total0:
                self.busy.append((1 - (idle - idle0) / (total - total0)) * (os.cpu_count() or 1))
            total0, idle0 = total, idle

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_demo(tree: Path, families: str, workdir: Path) -> dict[str, Any]:
    """One ``deploy.demo`` run from ``tree``; its phases (s), CPU by process class and table means."""
    from common.families.report.data import DATA_DIR_ENV, data_root

    # the data root is resolved here, once: a worktree elsewhere has no ../shared/data beside it
    env = {
        **os.environ,
        DATA_DIR_ENV: str(data_root().resolve()),
        "PYTHONPATH": str(tree),
        "HF_HUB_OFFLINE": "1",
        "ANONYMIZED_TELEMETRY": "False",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [sys.executable, "-m", "deploy.demo", "--workdir", str(workdir), "--families", families]
    marks: list[tuple[str, float]] = []
    means: dict[str, dict[str, float]] = {}
    header: list[str] = []
    family = ""
    lines: list[str] = []
    t0 = time.monotonic()
    with CpuSampler() as cpu:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - t0
            line = line.rstrip("\n")
            lines.append(line)
            if START_RE.match(line):
                marks.append(("start", now))
            elif m := PHASE_RE.match(line):
                marks.append((f"{m[1]} {m[2]}", now))
            elif END_RE.match(line):
                marks.append(("end", now))
            elif line.startswith("## ") and line.endswith(" sites"):
                family = line[3:-6]
            elif m := HEADER_RE.match(line):
                header = [c.strip() for c in m[1].split("|")]
            elif (m := MEAN_RE.match(line)) and family and header:
                means[family] = {
                    h: float(v) for h, v in zip(header, [c.strip() for c in m[1].split("|")], strict=False)
                }
        rc = proc.wait()
    if rc != 0 or not any(k == "end" for k, _ in marks):
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} (in {tree}) failed with rc={rc}:\n{tail}")
    phases: dict[str, float] = {}
    start = dict(marks)["start"]
    first_phase = next(t for k, t in marks if k not in ("start", "end"))
    phases["deployment"] = first_phase - start
    for (name, t), (_, t_next) in zip(marks, marks[1:], strict=False):
        if name not in ("start", "end"):
            phases[name] = t_next - t
    phases["total"] = dict(marks)["end"] - start
    busy = cpu.busy
    return {
        "phases": phases,
        "cpu_s": {k: round(v, 1) for k, v in sorted(cpu.by_class.items())},
        "busy_cores_mean": sum(busy) / len(busy) if busy else float("nan"),
        "means": means,
        "rc": rc,
    }


def worktree(ref: str, where: Path) -> Path:
    """A detached ``git worktree`` of ``ref`` (removed by :func:`drop_worktree`)."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(where), ref],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return where


def drop_worktree(where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True, text=True)
    shutil.rmtree(where, ignore_errors=True)


def _min(s: float) -> str:
    return f"{s / 60:.2f} min" if s >= 90 else f"{s:.0f} s"


def render(result: dict[str, Any]) -> str:
    lines = [
        "# The main job, phase by phase (issue 14 goal 1)",
        "",
        f"Generated by `{result['command']}` on {result['machine']['date_utc']} "
        f"({result['machine']['cpu_model']}, {result['machine']['cores']} cores, CPU flags "
        f"{result['machine'].get('cpu_flags') or 'n/a'}; load average before "
        f"{result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}). Each run is a fresh "
        "`python -m deploy.demo` (quick profile, embedded default: real SuperLink + SuperNodes on loopback "
        "with TLS and node auth, real data, real models) in a fresh workdir; baseline and current runs "
        "alternate. Baseline: `" + str(result["baseline"]) + "`; current: `" + result["current"] + "`.",
        "",
    ]
    for key, runs in result["sets"].items():
        goal = GOALS_S.get(key)
        lines += [f"## `--families {key}`" + (f" (goal: within {goal / 60:.0f} min)" if goal else ""), ""]
        phases = [p for p in runs[0]["phases"] if p != "total"] + ["total"]
        labels = [r["label"] for r in runs]
        rows = [[p, *[_min(r["phases"].get(p, float("nan"))) for r in runs]] for p in phases]
        if len(runs) >= 2 and runs[0]["label"].startswith("baseline"):
            base, cur = runs[0]["phases"], runs[-1]["phases"]
            for row, p in zip(rows, phases, strict=True):
                row.append(f"{base[p] / cur[p]:.2f}x" if p in base and p in cur and cur[p] > 0 else "")
            labels.append("baseline / current")
        lines += table(["phase", *labels], rows) + [""]
        total = runs[-1]["phases"]["total"]
        if goal:
            lines += [
                f"Current total {_min(total)} against {goal / 60:.0f} min: "
                f"**{'met' if total <= goal else 'not met'}**.",
                "",
            ]
        classes = sorted({c for r in runs for c in r["cpu_s"]})
        lines += ["CPU seconds by process (sampled from /proc each second) and mean busy cores:", ""]
        lines += table(
            ["process", *[r["label"] for r in runs]],
            [[c, *[f"{r['cpu_s'].get(c, 0):.0f}" for r in runs]] for c in classes]
            + [["mean busy cores", *[f"{r['busy_cores_mean']:.2f}" for r in runs]]],
        ) + [""]
        for fam in sorted({f for r in runs for f in r["means"]}):
            cols = sorted(
                {c for r in runs for c in r["means"].get(fam, {})},
                key=lambda c: (
                    ["base", "sim", "lin", "lin-l1", "nearest", "avg", "own"].index(c)
                    if c in ("base", "sim", "lin", "lin-l1", "nearest", "avg", "own")
                    else 99
                ),
            )
            lines += [f"Mean {fam} score per arm (leave-one-site-out table, mean row):", ""]
            lines += table(
                ["run", *cols],
                [[r["label"], *[f"{r['means'].get(fam, {}).get(c, float('nan')):.4f}" for c in cols]] for r in runs],
            ) + [""]
    return "\n".join(lines) + "\n"


#: the baseline ``run_all`` compares with: the last commit before the issue-14 main-job work
#: (bf16 compute, one packed array per adapter, whoami without torch, shorter polls)
BASELINE_REF = "d936017"


def measure(baseline: str, sets: list[str], scratch: Path) -> dict[str, Any]:
    """Every family set from the baseline worktree (if any) and this checkout, alternating."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "load_before": load_average(),
        "baseline": baseline or None,
        "current": head.stdout.strip() + (" + uncommitted changes" if dirty else ""),
        "sets": {},
    }
    trees = [("current", ROOT)]
    try:
        if baseline:
            trees.insert(0, (f"baseline {baseline}", worktree(baseline, scratch / "baseline")))
        for fams in sets:
            runs = []
            for label, tree in trees:
                log(f"main job --families {fams}: {label} ...")
                run = run_demo(tree, fams, scratch / "work")
                run["label"] = label
                runs.append(run)
                log(
                    f"  {label}: total {_min(run['phases']['total'])} "
                    + ", ".join(f"{k} {_min(v)}" for k, v in run["phases"].items() if k != "total")
                )
            result["sets"][fams] = runs
    finally:
        if baseline:
            drop_worktree(scratch / "baseline")
    result["load_after"] = load_average()
    return result


#: ``run_all``'s main-job area takes this measurement (a ``MAIN_JOB.json``) instead of running the
#: ~35-minute job again, and says so in the section
FROM_ENV = "RPE_MAIN_JOB_FROM"


def run(quick: bool, workdir: Path) -> Any:
    """``benchmarks.run_all`` area: the report federation (quick) or both family sets (full), each
    against :data:`BASELINE_REF`; goals judged on the current run's totals. With ``$RPE_MAIN_JOB_FROM``
    the figures come from that earlier ``python -m benchmarks.main_job`` run's JSON (named in the section)."""
    import json

    from benchmarks.util import Goal, Section

    sec = Section("main_job", "5. The main job (embedded default), phase by phase")
    earlier = os.environ.get(FROM_ENV)
    if earlier:
        result = json.loads(Path(earlier).read_text())
        sec.add(
            f"_Figures of the earlier run `{result['command']}` ({result['machine']['date_utc']}), read from "
            f"`{Path(earlier).name}`, not measured again by this `run_all` call._",
            "",
        )
    else:
        sets = ["report"] if quick else ["report", "report,segmentation"]
        result = measure(BASELINE_REF, sets, workdir / "main-job")
        result["command"] = "python -m benchmarks.run_all --only main_job"
    sec.add(*render(result).splitlines()[2:])
    for fams, runs in result["sets"].items():
        cur, base = runs[-1]["phases"]["total"], runs[0]["phases"]["total"]
        what = "report federation" if fams == "report" else "whole main job (reports + segmentation)"
        sec.goals.append(
            Goal(
                f"{what} within {GOALS_S[fams] / 60:.0f} min (issue 14)",
                f"≤ {GOALS_S[fams] / 60:.0f} min",
                _min(cur),
                cur <= GOALS_S[fams],
                f"baseline {BASELINE_REF} in the same run: {_min(base)} ({base / cur:.2f}x)" if len(runs) > 1 else "",
            )
        )
    sec.data = {"main_job": result}
    return sec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.main_job",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--baseline", default="", help="git ref of the baseline (default: none, current only)")
    parser.add_argument(
        "--sets",
        default="report;report,segmentation",
        help="family sets to run, ';'-separated (default: 'report;report,segmentation')",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "MAIN_JOB.md")
    args = parser.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(";") if s.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="rpe-main-job-"))
    try:
        result = measure(args.baseline, sets, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["command"] = "python -m benchmarks.main_job " + " ".join(argv or sys.argv[1:])
    write_json(args.out.with_suffix(".json"), result)
    args.out.write_text(render(result))
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
