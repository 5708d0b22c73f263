"""Shared helpers: progress output, timing, machine facts, Markdown tables, result records.

Every benchmark reports a figure *and* a ratio against a baseline measured in the same process,
interleaved with the subject where that is possible, so machine noise cancels out of the ratio.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
T0_ENV = "RPE_BENCH_T0"
# the suite's start (wall clock), shared with worker subprocesses through the environment
_T0 = float(os.environ.setdefault(T0_ENV, repr(time.time())))


def log(msg: str) -> None:
    """Progress line on stdout with the time since the suite started."""
    print(f"[bench {time.time() - _T0:7.1f}s] {msg}", flush=True)


def now() -> float:
    return time.perf_counter()


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def collect() -> None:
    gc.collect()


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Apparent size of all regular files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def dir_alloc_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes actually allocated on disk (st_blocks × 512) for all regular files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return "n/a"


def machine_info() -> dict[str, Any]:
    import torch

    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in have)
                    break
    except OSError:
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(),
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(_ram_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "chromadb": _version("chromadb"),
        "flwr": _version("flwr"),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
    }


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass
class Goal:
    """One goal of the issue: what was asked, what was measured, met or not (None: not measured)."""

    name: str
    target: str
    measured: str
    met: bool | None
    note: str = ""


@dataclass
class Section:
    key: str
    title: str
    lines: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fmt(x: Any, digits: int = 3) -> str:
    """Compact human formatting: ints with thousands separators, floats to ``digits`` significant."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:  # NaN
            return "n/a"
        if x == 0:
            return "0"
        ax = abs(x)
        if ax >= 1000:
            return f"{x:,.0f}"
        if ax >= 1e-3:
            return f"{x:.{digits}g}" if ax < 10**digits else f"{x:.0f}"
        return f"{x:.2e}"
    return str(x)


def ms(seconds: float) -> str:
    return fmt(seconds * 1000.0)


def ratio(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}×" if x < 100 else f"{x:,.0f}×"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        out.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    out.append("")
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = now()
    out = fn()
    return now() - t, out


def python() -> str:
    return sys.executable


THREADS_ENV = "RPE_BENCH_THREADS"


def apply_threads(threads: int | None = None) -> int:
    """Pin torch and BLAS thread counts (``threads`` or $RPE_BENCH_THREADS; 0/None = leave defaults).

    Returns the torch thread count in effect. Subprocesses inherit the setting via the environment.
    """
    import torch

    if threads is None:
        threads = int(os.environ.get(THREADS_ENV, "0") or 0)
    if threads > 0:
        os.environ[THREADS_ENV] = str(threads)
        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(threads)
        except Exception:  # noqa: BLE001 - optional
            pass
    return torch.get_num_threads()


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3
