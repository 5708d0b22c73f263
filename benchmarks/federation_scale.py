"""Issue 29: how the coordinator's cost grows with the number of sites, on one real SuperLink.

For each N: a real ``flower-superlink`` (TLS, SuperNode auth, the nginx proxy as deployed, the
operator socket) started by ``deploy.launch.up``, and N real ``flower-supernode`` processes on this
machine, each a site of the toy family (``tests/support/families/toy``: 12 examples of 8 floats, a
two-layer model, LoRA trained in milliseconds), so that what is measured is the coordinator, the
SuperLink and Flower's per-message machinery, not site compute. Then, through the operator socket
like an operator (``deploy.launch.run_app``):

1. ``mode=whoami`` (discovery: one ``query.whoami`` per online node, signed identity checked);
2. ``mode=enroll`` (every site trains, signs and sends its adapter + z; the registry stores them);
3. ``mode=compose`` with 10 targets (embed, retrieve, compose, deliver signed, apply, metrics);
4. ``mode=evaluate`` with 10 targets (leave-one-site-out: the target's own adapter is never a
   candidate; arms ``sim`` and base).

Per run: wall time (submission to the end of ``flwr ls``), the ServerApp's own time, CPU seconds of
the SuperLink, of its ServerApp, of nginx, and of the sites' processes (SuperNode, their SuperExec,
the ``flwr-clientapp`` per message), sampled from ``/proc`` every 0.5 s; the SuperLink's peak RSS
(``VmHWM``); messages sent / re-sent / probes / unanswered (``report["messages"]``,
``server/messaging.py``); HTTP status counts from nginx's access log (every Fleet request of every
site passes it); every process that exited (the SuperLink, nginx, a SuperNode restarted by
``ensure_supernodes``, a SuperExec restarted by ``ensure_superexec``) and "database is locked" in
the logs. Before the runs, ``--idle`` seconds with every site online and nothing to do: the idle
cost per site.

``--idle-sweep N``: the idle-cost / first-message-latency trade-off of the SuperNode poll interval
(``deploy/supernode_main.py``): a fresh deployment of N sites per interval, its idle SuperLink CPU
and a ``whoami`` run's discovery time.

``--profile``: py-spy records the SuperLink and the ServerApp of every run at the largest N
(``<out>.profile/*.txt``, collapsed stacks).

    nice -n 5 .venv/bin/python -m benchmarks.federation_scale --n 10 25 50 100 \
        --idle-sweep 25 --profile --out benchmarks/FEDERATION_SCALE.md

Memory: every site is a SuperNode and its SuperExec (~100 MB each) plus one ``flwr-clientapp``
per message; the benchmark stops an N when the machine's available memory falls below
``--min-free-gib`` and reports that N as the one where the machine broke, and why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOY = "toy=support.families.toy:FAMILY"
RELEASE = {"z-min-examples": 5, "metrics-min-reports": 2}
N_TARGETS = 10
#: how long one run may take before the benchmark stops waiting for it (at 50 sites on the loaded
#: 2-core machine, discovery alone took 10 min and enrolment was estimated at 90 min more)
RUN_TIMEOUT_S = 3 * 3600.0
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ROLES = ("superlink", "serverapp", "link-superexec", "proxy", "supernode", "site-superexec", "clientapp")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# -- /proc sampling ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, start time, utime + stime ticks, rss pages) of ``pid``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2 :].split()
    return int(f[1]), int(f[19]), int(f[11]) + int(f[12]), int(f[21])


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler:
    """CPU ticks and RSS of every process of the deployment, by role, every ``interval`` s.

    Roots come from the launch state (SuperLink, nginx, every SuperNode, re-read every 5 s so a
    restarted SuperNode is followed); a process is classified by its nearest root ancestor and its
    command line. A process that exits between two samples loses at most ``interval`` s of CPU."""

    def __init__(self, workdir: Path, interval: float = 0.5, min_free_gib: float = 1.5) -> None:
        self.workdir, self.interval, self.min_free_gib = workdir, interval, min_free_gib
        self.ticks: dict[tuple[int, int], int] = {}
        self.role: dict[tuple[int, int], str] = {}
        self.rss_peak_total = 0
        self.min_available = float("inf")
        self.low_memory = ""
        self.roots: dict[int, str] = {}
        self._roots_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _load_roots(self) -> None:
        from deploy import launch

        state = launch.load_state(self.workdir)
        roots = {}
        if state.get("superlink"):
            roots[state["superlink"]["pid"]] = "superlink"
        if state.get("proxy"):
            roots[state["proxy"]["pid"]] = "proxy"
        for proc in state.get("sites", {}).values():
            roots[proc["pid"]] = "supernode"
        self.roots, self._roots_at = roots, time.monotonic()

    def sample(self) -> None:
        with self._lock:
            if time.monotonic() - self._roots_at > 5.0:
                self._load_roots()
            table: dict[int, tuple[int, int, int, int]] = {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    st = _stat(int(entry.name))
                    if st is not None:
                        table[int(entry.name)] = st
            rss = 0
            for pid, (_, start, ticks, pages) in table.items():
                role = self._classify(pid, table)
                if role is None:
                    continue
                key = (pid, start)
                if key not in self.role:
                    cmd = _cmd(pid)
                    if role == "link-child":
                        role = "serverapp" if "serverapp" in cmd else "link-superexec"
                    elif role == "site-child":
                        role = "clientapp" if "clientapp" in cmd else "site-superexec"
                    self.role[key] = role
                self.ticks[key] = max(self.ticks.get(key, 0), ticks)
                rss += pages * PAGE
            self.rss_peak_total = max(self.rss_peak_total, rss)
            avail = mem_available_gib()
            self.min_available = min(self.min_available, avail)
            if avail < self.min_free_gib and not self.low_memory:
                from deploy import launch

                started = len(launch.load_state(self.workdir).get("sites", {}))
                self.low_memory = (
                    f"available memory fell to {avail:.2f} GiB with {started} SuperNodes started (this "
                    f"deployment's processes: {rss / 2**30:.1f} GiB RSS); the deployment was stopped"
                )
                log(f"LOW MEMORY: {self.low_memory}")
                # stop it now, before the kernel's OOM killer picks a process (perhaps another user's)
                threading.Thread(target=launch.down, args=(self.workdir, 5.0), daemon=True).start()

    def _classify(self, pid: int, table: dict[int, tuple[int, int, int, int]]) -> str | None:
        if pid in self.roots:
            return self.roots[pid]
        seen, cur = 0, table[pid][0]
        while cur > 1 and seen < 12:
            if cur in self.roots:
                return {"superlink": "link-child", "supernode": "site-child", "proxy": "proxy"}[self.roots[cur]]
            if cur not in table:
                return None
            cur, seen = table[cur][0], seen + 1
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a sample lost is not the run lost
                log(f"sampler: {exc}")

    def cpu(self) -> dict[str, float]:
        """Cumulative CPU seconds per role, right now."""
        self.sample()
        out = dict.fromkeys(ROLES, 0.0)
        with self._lock:
            for key, ticks in self.ticks.items():
                out[self.role[key]] = out.get(self.role[key], 0.0) + ticks / TICK
        return out


def _pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def site_pss_mib(workdir: Path) -> dict[str, float]:
    """Mean proportional memory (PSS) of one idle site: its SuperNode and the SuperExec it started."""
    from deploy import launch

    sites = launch.load_state(workdir).get("sites", {})
    node = [_pss_mib(p["pid"]) for p in sites.values()]
    execs = [
        _pss_mib(pid) for p in sites.values() for pid, _ in launch.descendants(p["pid"]) if "superexec" in _cmd(pid)
    ]
    return {
        "supernode": round(sum(node) / max(1, len(node)), 1),
        "superexec": round(sum(execs) / max(1, len(execs)), 1),
        "site": round((sum(node) + sum(execs)) / max(1, len(node)), 1),
    }


def cpu_diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in after}


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# -- nginx's access log ------------------------------------------------------------------------

_REQ = re.compile(r'"[A-Z]+ (\S+) [^"]*" (\d{3}) ')


class AccessLog:
    """Requests through the proxy since the last :meth:`take`: by status and by Fleet route."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def take(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
                self.offset += len(data)
        except OSError:
            return {"requests": 0, "status": {}, "routes": {}, "5xx": 0}
        status: Counter[str] = Counter()
        routes: Counter[str] = Counter()
        for m in _REQ.finditer(data.decode(errors="replace")):
            status[m.group(2)] += 1
            routes[m.group(1).rsplit("/", 1)[-1]] += 1
        return {
            "requests": sum(status.values()),
            "status": dict(status),
            "routes": dict(routes.most_common(8)),
            "5xx": sum(v for k, v in status.items() if k.startswith("5")),
        }


# -- the federation ----------------------------------------------------------------------------


def site_id(i: int) -> str:
    return f"s{i:03d}"


def make_sites(root: Path, n: int, poll: float) -> tuple[Path, list[Any]]:
    from support.families.toy import make_toy_base, write_toy_site

    from deploy import launch

    model = make_toy_base(root / "model")
    specs = []
    for i in range(n):
        site = site_id(i)
        data = write_toy_site(root / "data" / site, seed=1000 + i)
        specs.append(
            launch.SiteSpec(
                site,
                str(data),
                str(model),
                threads=1,
                release=dict(RELEASE),
                extra={"task": "toy", "poll-interval": poll},
            )
        )
    return model, specs


def base_config(model: Path, registry: Path, **over: Any) -> dict[str, Any]:
    return {
        "registry-dir": str(registry),
        "base-model": str(model),
        "task": "toy",
        "chroma": "off",
        "steps": 15,
        "lora-r": 2,
        "lora-alpha": 4.0,
        "lr": 0.1,
        "require-signatures": True,
        "timeout-query": 600.0,
        "timeout-train": 900.0,
        **over,
    }


class Profiler:
    """py-spy on the SuperLink for the whole run and on each ServerApp as soon as it appears."""

    def __init__(self, out_dir: Path, superlink_pid: int, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag
        out_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = self.out_dir / f"{self.tag}-superlink-{superlink_pid}.txt"
        cmd = [self.py_spy, "record", "--pid", str(superlink_pid), "--format", "raw", "--rate", "25"]
        cmd += ["--nonblocking", "--subprocesses", "--output", str(out)]  # its SuperExec and every ServerApp too
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_one(fed: dict[str, Any], name: str, config: dict[str, Any], timeout: float) -> dict[str, Any]:
    from deploy import launch

    sampler: Sampler = fed["sampler"]
    before_cpu = sampler.cpu()
    fed["access"].take()
    pids_before = {s: p["pid"] for s, p in launch.load_state(fed["workdir"]).get("sites", {}).items()}
    t0 = time.monotonic()
    box: dict[str, Any] = {}

    def submit() -> None:
        try:
            box["res"] = launch.run_app(fed["flwr_home"], REPO, config, fed["registry"], timeout, poll_s=10.0)
        except Exception as exc:  # noqa: BLE001 - the failure is the measurement
            box["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=submit, daemon=True)
    worker.start()
    while worker.is_alive() and not sampler.low_memory:
        worker.join(1.0)
    if worker.is_alive():  # the deployment was stopped for want of memory: the run cannot end
        box["error"] = f"abandoned: {sampler.low_memory}"
    res = box.get("res") or {"status": "error", "report": {}}
    error = box.get("error", "")
    wall = time.monotonic() - t0
    cpu = cpu_diff(sampler.cpu(), before_cpu)
    state = launch.load_state(fed["workdir"])
    restarted = sorted(s for s, p in state.get("sites", {}).items() if pids_before.get(s) not in (None, p["pid"]))
    report = res.get("report") or {}
    out = {
        "run": name,
        "status": res.get("status"),
        "details": res.get("details", ""),
        "error": error or report.get("error", ""),
        "wall_s": round(wall, 2),
        "serverapp_wall_s": round(report["finished_at"] - report["started_at"], 2)
        if report.get("finished_at")
        else None,
        "timings": report.get("timings", {}),
        "messages": report.get("messages", {}),
        "online": len(report.get("online", {})),
        "discovery_problems": len(report.get("discovery_problems", {})),
        "cpu_s": cpu,
        "http": fed["access"].take(),
        "supernodes_restarted": restarted,
        "outcome": outcome(name, report),
        "low_memory": sampler.low_memory,
    }
    log(
        f"  {name}: {out['status']} wall {wall:.1f} s, SuperLink {cpu['superlink']:.1f} s CPU, ServerApp "
        f"{cpu['serverapp']:.1f} s, sites {cpu['clientapp'] + cpu['supernode'] + cpu['site-superexec']:.1f} s, "
        f"5xx {out['http']['5xx']}, messages {out['messages']}, outcome {out['outcome']}"
        + (f", restarted {restarted}" if restarted else "")
        + (f", ERROR {out['error'][:300]}" if out["error"] else "")
    )
    return out


def outcome(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """What the run achieved: online sites, accepted enrolments, delivered compositions, scored targets."""
    got: dict[str, Any] = {"online": len(report.get("online", {}))}
    section = report.get(name)
    if isinstance(section, dict):
        per_site = [r for r in section.values() if isinstance(r, dict) and "status" in r]
        if per_site:
            got["statuses"] = dict(Counter(str(r["status"]) for r in per_site))
        if isinstance(section.get("problems"), dict):
            got["problems"] = len(section["problems"])
        rows = section.get("rows") or section.get("results")
        if isinstance(rows, (list, dict)):
            got["rows"] = len(rows)
    return got


def count_in_logs(paths: list[Path], pattern: str, keep: list[str] | None = None) -> int:
    """Lines of ``paths`` matching the regex ``pattern``; the first few go to ``keep`` (file: line)."""
    rx, n = re.compile(pattern), 0
    for p in paths:
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if rx.search(line):
                n += 1
                if keep is not None and len(keep) < 5:
                    keep.append(f"{p.name}: {line.strip()[:300]}")
    return n


def measure_n(
    n: int,
    root: Path,
    poll: float,
    idle_s: float,
    profile_dir: Path | None,
    min_free_gib: float,
    runs: list[str],
    save: Any = lambda result: None,
) -> dict[str, Any]:
    from deploy import launch

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, specs = make_sites(root, n, poll)
    workdir, registry = root / "fed", root / "registry"
    sampler = Sampler(workdir, min_free_gib=min_free_gib)
    result: dict[str, Any] = {
        "n": n,
        "poll_interval_s": poll,
        "runs": {},
        "mem_available_gib_before": round(mem_available_gib(), 2),
    }
    log(f"N={n}: deployment up (SuperLink + nginx + {n} SuperNodes, poll {poll:g} s)")
    t0 = time.monotonic()
    sampler.start()
    profiler = None
    try:
        try:
            state = launch.up(
                workdir,
                specs,
                port=launch.free_port(),
                registry=str(registry),
                timeout=max(120.0, 4.0 * n),
                proxy=True,
                site_networks=["127.0.0.0/8"],
            )
        except Exception as exc:  # noqa: BLE001
            result["broke"] = f"deployment did not come up: {type(exc).__name__}: {str(exc)[:800]}"
            result["low_memory"] = sampler.low_memory
            log(f"N={n}: {result['broke']}")
            return result
        result["up_s"] = round(time.monotonic() - t0, 1)
        result["up_cpu_s"] = sampler.cpu()
        fed = {
            "workdir": workdir,
            "registry": registry,
            "flwr_home": Path(state["flwr_home"]),
            "sampler": sampler,
            "access": AccessLog(workdir / "proxy" / "logs" / "access.log"),
        }
        fed["access"].take()
        log(f"N={n}: up in {result['up_s']} s; idle {idle_s:g} s")
        before = sampler.cpu()
        time.sleep(idle_s)
        idle = cpu_diff(sampler.cpu(), before)
        http = fed["access"].take()
        result["idle"] = {
            "seconds": idle_s,
            "cpu_s": idle,
            "http": http,
            "superlink_cpu_s_per_site_min": round((idle["superlink"] + idle["proxy"]) / n / (idle_s / 60), 4),
            "requests_per_s": round(http["requests"] / idle_s, 2),
        }
        result["idle"]["pss_mib_per_site"] = site_pss_mib(workdir)
        save(result)
        log(
            f"  idle: {result['idle']['superlink_cpu_s_per_site_min']} SuperLink+nginx CPU s / site / min, "
            f"{result['idle']['requests_per_s']} requests/s"
        )
        if profile_dir is not None:
            profiler = Profiler(profile_dir, state["superlink"]["pid"], f"n{n}")
        targets = ",".join(site_id(i) for i in range(min(N_TARGETS, n)))
        plan = [
            ("whoami", base_config(model, registry, mode="whoami")),
            ("enroll", base_config(model, registry, mode="enroll")),
            ("compose", base_config(model, registry, mode="compose", target=targets, strategy="sim", k=2)),
            (
                "evaluate",
                base_config(model, registry, mode="evaluate", target=targets, k=2, **{"eval-strategies": "sim"}),
            ),
        ]
        for name, config in plan:
            if name not in runs:
                continue
            result["runs"][name] = run_one(fed, name, config, timeout=RUN_TIMEOUT_S)
            save(result)
            if sampler.low_memory:
                result["broke"] = f"during {name}: {sampler.low_memory}"
                break
        state = launch.load_state(workdir)
        link = state["superlink"]
        result["superlink_peak_rss_mib"] = round(vm_hwm_mib(link["pid"]), 1)
        result["superlink_alive"] = launch.is_alive(link["pid"], link["start_time"])
        result["proxy_alive"] = bool(state.get("proxy")) and launch.is_alive(
            state["proxy"]["pid"], state["proxy"]["start_time"]
        )
        result["superexec_restarted"] = (workdir / "logs" / "superexec-restarted.log").exists()
        logs = sorted((workdir / "logs").glob("*.log"))
        result["log_lines"] = []
        result["database_locked_in_logs"] = count_in_logs(logs, "database is locked", result["log_lines"])
        result["http_500_in_supernode_logs"] = count_in_logs(
            [p for p in logs if "supernode" in p.name],
            r"(HTTP|status|code).{0,12}\b5\d\d\b|Internal Server Error",
            result["log_lines"],
        )
        result["processes_peak_rss_gib"] = round(sampler.rss_peak_total / 2**30, 2)
        result["min_available_gib"] = round(sampler.min_available, 2)
        result["superlink_db_mib"] = (
            round((workdir / "superlink.db").stat().st_size / 2**20, 2) if (workdir / "superlink.db").exists() else None
        )
        result["registry_records"] = sum(
            1 for f in registry.rglob("records.jsonl") for line in f.read_text().splitlines() if line.strip()
        )
    finally:
        if profiler is not None:
            profiler.stop()
        log(f"N={n}: down")
        try:
            launch.down(workdir, timeout=15.0)
        finally:
            sampler.stop()
    return result


def idle_sweep(n: int, root: Path, polls: list[float], idle_s: float, min_free_gib: float) -> list[dict[str, Any]]:
    """Per poll interval: a fresh deployment of N sites, its idle cost, and a whoami run."""
    from deploy import launch

    rows = []
    for poll in polls:
        base = root / f"idle-{poll:g}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        model, specs = make_sites(base, n, poll)
        workdir, registry = base / "fed", base / "registry"
        sampler = Sampler(workdir, min_free_gib=min_free_gib).start()
        log(f"idle sweep: N={n}, poll {poll:g} s")
        try:
            state = launch.up(
                workdir,
                specs,
                port=launch.free_port(),
                registry=str(registry),
                timeout=max(120.0, 4.0 * n),
                proxy=True,
                site_networks=["127.0.0.0/8"],
            )
            fed = {
                "workdir": workdir,
                "registry": registry,
                "flwr_home": Path(state["flwr_home"]),
                "sampler": sampler,
                "access": AccessLog(workdir / "proxy" / "logs" / "access.log"),
            }
            time.sleep(5.0)
            fed["access"].take()
            before = sampler.cpu()
            time.sleep(idle_s)
            idle = cpu_diff(sampler.cpu(), before)
            http = fed["access"].take()
            whoami = [run_one(fed, "whoami", base_config(model, registry, mode="whoami"), 600.0) for _ in range(1)]
            rows.append(
                {
                    "poll_interval_s": poll,
                    "n": n,
                    "idle_cpu_s": idle,
                    "superlink_cpu_s_per_site_min": round((idle["superlink"] + idle["proxy"]) / n / (idle_s / 60), 4),
                    "superlink_only_cpu_s_per_site_min": round(idle["superlink"] / n / (idle_s / 60), 4),
                    "requests_per_s": round(http["requests"] / idle_s, 2),
                    "discover_s": [w["timings"].get("discover") for w in whoami],
                    "whoami_wall_s": [w["wall_s"] for w in whoami],
                }
            )
            log(f"  poll {poll:g}: {rows[-1]}")
        finally:
            launch.down(workdir, timeout=15.0)
            sampler.stop()
    return rows


# -- the document ------------------------------------------------------------------------------


def registry_batch(sizes: list[int], root: Path) -> list[dict[str, Any]]:
    """The registry's writes of one re-enrolment round of N sites (each site's new adapter supersedes
    its first), as the enrolment stored it before (``add`` + ``supersede`` per site) and as one
    commit (``Registry.add_submissions``): fsyncs per file kind (``os.fsync`` wrapped in-process)
    and wall seconds. Registry-only (tiny adapters, Chroma off): the disk's share, not Flower's."""
    import numpy as np
    from support.registry import BASE, DIM, SHAPES, make_adapter

    from common.adapters import adapter_to_bytes
    from server.registry import AdapterMeta, Registry, Submission

    counts: Counter[str] = Counter()
    real = os.fsync

    def counting(fd: int) -> None:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = "?"
        kind = Path(name).name if Path(name).name in ("records.jsonl", "audit.jsonl", "z.f32") else "other"
        counts["blobs" if "/blobs/" in name else kind] += 1
        real(fd)

    def subs(n: int, seed: int) -> list[Any]:
        rng = np.random.default_rng(seed)
        return [
            Submission(
                adapter_to_bytes(make_adapter(seed * 1000 + i)),
                rng.standard_normal(DIM).astype(np.float32),
                AdapterMeta(site=f"s{i:03d}", task="t", modality="text", base_fingerprint=BASE, sample_count=10),
                None,
                {"run_id": f"r{seed}", "nonce": f"n{seed}-{i}"},
            )
            for i in range(n)
        ]

    out = []
    for n in sizes:
        row: dict[str, Any] = {"n": n}
        for how in ("per_site", "batch"):
            path = root / f"{how}-{n}"
            shutil.rmtree(path, ignore_errors=True)
            Registry.init(path, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM).close()
            with Registry(path, chroma="off") as reg:
                reg.add_submissions(subs(n, 1))  # the first round
                round2 = subs(n, 2)
                counts.clear()
                os.fsync = counting
                t0 = time.perf_counter()
                try:
                    if how == "batch":
                        reg.add_submissions(round2, supersede=True)
                    else:  # what run_enroll did before: add, then supersede, per site
                        for sub in round2:
                            rec = reg.add(sub.adapter, sub.z, sub.meta, audit_fields=dict(sub.audit_fields))
                            reg.supersede(rec.id, run_id="r2")
                finally:
                    os.fsync = real
                row[how] = {"wall_s": round(time.perf_counter() - t0, 3), "fsyncs": dict(counts)}
                assert reg.verify() == [] and len(reg) == n
            shutil.rmtree(path, ignore_errors=True)
        out.append(row)
        log(f"registry batch N={n}: {row}")
    return out


def _fmt(x: Any, d: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{d}f}"
    return str(x)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Cost per site vs N, as a ratio to the smallest N: the SuperLink's (+ nginx's) CPU per site per
    minute idle and during the enrolment run (measured also when the run did not finish), and the
    share of Fleet requests the SuperNodes gave up on (499) or got a 5xx for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("idle")]
    if not ok:
        return
    base = ok[0]

    def idle_rate(r: dict[str, Any]) -> float:
        return float(r["idle"]["superlink_cpu_s_per_site_min"])

    def enrol_rate(r: dict[str, Any]) -> float | None:
        run = (r.get("runs") or {}).get("enroll")
        if not run or not run.get("wall_s"):
            return None
        return (run["cpu_s"]["superlink"] + run["cpu_s"]["proxy"]) / r["n"] / (run["wall_s"] / 60.0)

    def failed_share(r: dict[str, Any], which: str) -> float | None:
        http = (
            (r.get("idle") or {}).get("http")
            if which == "idle"
            else ((r.get("runs") or {}).get(which) or {}).get("http")
        )
        if not http or not http.get("requests"):
            return None
        bad = sum(v for k, v in http["status"].items() if k == "499" or k.startswith("5"))
        return 100.0 * bad / http["requests"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = [r["n"] for r in ok]
    axes[0].plot(ns, [idle_rate(r) / idle_rate(base) for r in ok], marker="o", label="idle")
    e = [(r["n"], enrol_rate(r)) for r in ok if enrol_rate(r) is not None]
    if e and enrol_rate(base):
        axes[0].plot([n for n, _ in e], [v / enrol_rate(base) for _, v in e], marker="s", label="during enrolment")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel(f"ratio to N = {base['n']}")
    axes[0].set_title("SuperLink + nginx CPU per site per minute")
    for which, marker in (("idle", "o"), ("enroll", "s")):
        pts = [(r["n"], failed_share(r, which)) for r in ok if failed_share(r, which) is not None]
        axes[1].plot([n for n, _ in pts], [v for _, v in pts], marker=marker, label=which)
    axes[1].set_ylabel("% of Fleet requests")
    axes[1].set_title("requests abandoned by the SuperNode (499) or 5xx")
    for ax in axes:
        ax.set_xlabel("sites N")
        ax.set_xticks(ns)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_rows(results: list[dict[str, Any]]) -> list[str]:
    """One Markdown row per (N, run): the figures of the issue, the cost per site and its ratio to the first N."""
    lines = [
        "| N | run | outcome | wall s | ServerApp s | discover s | SuperLink CPU s | ServerApp CPU s | nginx CPU s "
        "| sites' CPU s | coord. CPU / site | ratio to N=" + str(results[0]["n"]) + " | SuperLink+nginx CPU above "
        "idle polling / site | sent / resent / probes / "
        "unanswered | HTTP requests | 5xx | exited |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    base = results[0]
    for r in results:
        for name, run in r.get("runs", {}).items():
            cpu, msg = run["cpu_s"], run.get("messages") or {}
            coord = (cpu["superlink"] + cpu["serverapp"] + cpu["proxy"]) / r["n"]
            b = base["runs"].get(name)
            ratio = "–"
            if b:
                bc = (b["cpu_s"]["superlink"] + b["cpu_s"]["serverapp"] + b["cpu_s"]["proxy"]) / base["n"]
                ratio = f"{coord / bc:.2f}" if bc else "–"
            sites = cpu["supernode"] + cpu["site-superexec"] + cpu["clientapp"]
            statuses = (run.get("outcome") or {}).get("statuses")
            outcome = f"{run['status']}; online {run['online']}" + (
                "; " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) if statuses else ""
            )
            exited = ", ".join(run.get("supernodes_restarted") or []) or "none"
            idle_rate = ((r.get("idle") or {}).get("superlink_cpu_s_per_site_min") or 0.0) / 60.0  # s per site-second
            above = (cpu["superlink"] + cpu["proxy"] - idle_rate * r["n"] * run["wall_s"]) / r["n"]
            lines.append(
                f"| {r['n']} | {name} | {outcome} | {_fmt(run['wall_s'])} | {_fmt(run.get('serverapp_wall_s'))} "
                f"| {_fmt(run['timings'].get('discover'))} | {_fmt(cpu['superlink'])} | {_fmt(cpu['serverapp'])} "
                f"| {_fmt(cpu['proxy'])} | {_fmt(sites)} | {coord:.3f} | {ratio} | {above:.3f} "
                f"| {msg.get('sent', '–')} / {msg.get('resent', '–')} / {msg.get('probes', '–')} / "
                f"{msg.get('unanswered', '–')} | {run['http']['requests']} | {run['http']['5xx']} | {exited} |"
            )
    return lines


def profile_summary(path: Path, top: int = 12) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks of one ``--subprocesses`` recording, per process kind: samples,
    the functions with the most samples inclusive (any frame) and exclusive (innermost frame)."""
    kinds: dict[str, dict[str, Counter[str]]] = {}
    totals: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]  # the SuperLink, then the child sampled
        head = procs[-1] if procs else ""
        kind = "serverapp" if "serverapp" in head else "superexec" if "superexec" in head else "superlink"
        frames = [f for f in frames if not f.startswith("process ")]
        k = kinds.setdefault(kind, {"incl": Counter(), "excl": Counter()})
        n = int(count)
        totals[kind] += n
        seen = set()
        for f in frames:
            name = re.sub(r":\d+\)$", ")", f.strip())
            if name not in seen:
                k["incl"][name] += n
                seen.add(name)
        if frames:
            k["excl"][re.sub(r":\d+\)$", ")", frames[-1].strip())] += n
    return {
        kind: {
            "samples": totals[kind],
            "inclusive": [(f, n, round(100 * n / totals[kind], 1)) for f, n in c["incl"].most_common(top)],
            "exclusive": [(f, n, round(100 * n / totals[kind], 1)) for f, n in c["excl"].most_common(top)],
        }
        for kind, c in kinds.items()
    }


def render(doc: dict[str, Any]) -> list[str]:
    """The generated part of FEDERATION_SCALE.md: every table, from the JSON."""
    runs = [r for r in doc.get("runs", []) if r.get("runs")]
    lines = ["### Per N and run", ""]
    lines += table_rows(runs) if runs else ["(no N completed a run)"]
    lines += ["", "### Deployment, idle cost, memory, failures per N", ""]
    lines += [
        "| N | up s | idle SuperLink+nginx CPU s / site / min | idle requests/s | PSS per idle site MiB "
        "| SuperLink peak RSS MiB | SQLite state MiB | peak RSS all processes GiB | min. available GiB "
        "| DB locked / 500 in logs | SuperLink, nginx alive | broke |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in doc.get("runs", []):
        idle = r.get("idle") or {}
        pss = (idle.get("pss_mib_per_site") or {}).get("site")
        lines.append(
            f"| {r['n']} | {_fmt(r.get('up_s'))} | {_fmt(idle.get('superlink_cpu_s_per_site_min'), 3)} "
            f"| {_fmt(idle.get('requests_per_s'))} | {_fmt(pss)} | {_fmt(r.get('superlink_peak_rss_mib'))} "
            f"| {_fmt(r.get('superlink_db_mib'))} | {_fmt(r.get('processes_peak_rss_gib'), 2)} "
            f"| {_fmt(r.get('min_available_gib'), 2)} | {r.get('database_locked_in_logs', '–')} / "
            f"{r.get('http_500_in_supernode_logs', '–')} | {r.get('superlink_alive', '–')}, "
            f"{r.get('proxy_alive', '–')} | {r.get('broke', '') or 'no'} |"
        )
    batch = doc.get("registry_batch") or []
    if batch:
        lines += ["", "### The registry's writes of one re-enrolment round (fsyncs; wall s on the loaded machine)", ""]
        lines += [
            "| N | stored | records.jsonl | audit.jsonl | z column | blob files + dirs | other | wall s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for b in batch:
            for how, label in (("per_site", "add + supersede per site (before)"), ("batch", "one commit (now)")):
                f = b[how]["fsyncs"]
                lines.append(
                    f"| {b['n']} | {label} | {f.get('records.jsonl', 0)} | {f.get('audit.jsonl', 0)} "
                    f"| {f.get('z.f32', 0)} | {f.get('blobs', 0)} | {f.get('other', 0)} | {_fmt(b[how]['wall_s'], 3)} |"
                )
    sweep = doc.get("idle_sweep") or []
    if sweep:
        lines += ["", f"### Idle cost vs the SuperNode poll interval (N = {sweep[0]['n']})", ""]
        lines += [
            "| poll interval s | SuperLink+nginx CPU s / idle site / min | SuperLink alone | requests/s "
            "| whoami run: discovery s | whoami run: wall s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in sweep:
            lines.append(
                f"| {row['poll_interval_s']:g} | {row['superlink_cpu_s_per_site_min']:.3f} "
                f"| {row['superlink_only_cpu_s_per_site_min']:.3f} | {row['requests_per_s']:.2f} "
                f"| {', '.join(_fmt(x) for x in row['discover_s'])} | {', '.join(_fmt(x) for x in row['whoami_wall_s'])} |"
            )
    for kind, summary in (doc.get("profile") or {}).items():
        lines += ["", f"### Profile: {kind} ({summary['samples']} samples)", ""]
        lines += ["| inclusive | % | exclusive (innermost) | % |", "|---|---:|---|---:|"]
        for (fi, _, pi), (fe, _, pe) in zip(summary["inclusive"], summary["exclusive"]):
            lines.append(f"| `{fi}` | {pi} | `{fe}` | {pe} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--n", type=int, nargs="+", default=[10, 25, 50, 100], help="numbers of sites (default 10 25 50 100)"
    )
    p.add_argument("--poll-interval", type=float, default=1.0, help="SuperNode idle poll interval (default 1 s)")
    p.add_argument("--idle", type=float, default=30.0, help="seconds idle before the runs, per N")
    p.add_argument("--idle-sweep", type=int, default=0, metavar="N", help="also sweep the poll interval at N sites")
    p.add_argument("--sweep-polls", type=float, nargs="+", default=[0.5, 1.0, 3.0, 5.0])
    p.add_argument("--runs", default="whoami,enroll,compose,evaluate", help="which runs, comma-separated")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="py-spy the SuperLink and ServerApps at N")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rpe-fscale"))
    p.add_argument(
        "--min-free-gib",
        type=float,
        default=3.0,
        help="stop an N's deployment at once when the machine's available memory falls below this",
    )
    p.add_argument(
        "--max-sites-in-flight",
        type=int,
        default=12,
        help="$RPE_MAX_SITES_IN_FLIGHT for the ServerApp: at most this many sites hold a message at once "
        "(bounds the ClientApps' memory when every site runs on this machine; 0 = no limit)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "FEDERATION_SCALE.json",
        help="JSON results (merged by N into an existing file)",
    )
    p.add_argument("--render", action="store_true", help="only print the tables of --out (Markdown)")
    p.add_argument(
        "--registry-batch",
        type=int,
        nargs="+",
        metavar="N",
        help="only measure the registry's writes of a re-enrolment round of N sites, per site vs one commit",
    )
    args = p.parse_args(argv)
    if args.render:
        doc = json.loads(args.out.read_text())
        prof = args.out.with_suffix(".profile")
        if prof.is_dir() and not doc.get("profile"):
            summaries: dict[str, Any] = {}
            for f in sorted(prof.glob("*.txt")):
                for kind, summary in profile_summary(f).items():
                    summaries[f"{f.stem} {kind}"] = summary
            doc["profile"] = summaries
            args.out.write_text(json.dumps(doc, indent=1, default=str))
        print("\n".join(render(doc)))
        return 0

    if args.registry_batch:
        sys.path[:0] = [str(REPO), str(REPO / "tests")]
        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        doc["registry_batch"] = registry_batch(args.registry_batch, args.workdir / "registry-batch")
        args.out.write_text(json.dumps(doc, indent=1, default=str))
        return 0
    os.environ["RPE_FAMILIES"] = TOY
    os.environ["RPE_MAX_SITES_IN_FLIGHT"] = str(args.max_sites_in_flight)  # the SuperLink passes it on
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    out = args.out if args.out.suffix == ".json" else args.out.with_suffix(".json")
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("runs", [])
    from benchmarks.util import load_average, machine_info

    machine = machine_info()

    for n in args.n:
        load0 = load_average()
        prof = out.with_suffix(".profile") if args.profile == n else None

        def save(res: dict[str, Any], n: int = n, load0: tuple[float, ...] = load0) -> None:
            res["load_before"], res["load_after"] = load0, load_average()
            res["date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            doc["runs"] = sorted([r for r in doc["runs"] if r.get("n") != n] + [res], key=lambda r: r["n"])
            doc["machine"] = machine
            out.write_text(json.dumps(doc, indent=1, default=str))

        res = measure_n(
            n,
            args.workdir / f"n{n}",
            args.poll_interval,
            args.idle,
            prof,
            args.min_free_gib,
            args.runs.split(","),
            save,
        )
        save(res)
        plot(doc["runs"], out.with_suffix(".png"))
        shutil.rmtree(args.workdir / f"n{n}", ignore_errors=True)
    if args.idle_sweep:
        doc["idle_sweep"] = idle_sweep(
            args.idle_sweep, args.workdir / "sweep", args.sweep_polls, args.idle, args.min_free_gib
        )
        out.write_text(json.dumps(doc, indent=1, default=str))
        shutil.rmtree(args.workdir / "sweep", ignore_errors=True)
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
