"""Goal 2 at full size without the insert path: a 100,000 × 4096 registry written directly (z column
+ records.jsonl lines in the registry's format), then ``Registry(path)`` timed, against the same
records in the format before the z column (base64 z in each line) opened read-only by today's code.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.registry_reopen --n 100000 --out benchmarks/REGISTRY_REOPEN.json``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.registry import FP, MODULE, SHAPE, _meta  # noqa: E402
from benchmarks.util import log, now  # noqa: E402


def build(root: Path, n: int, d: int, old: Path | None) -> None:
    """Registry ``root`` with ``n`` records (one shared fake blob hash); ``old``: the base64 copy."""
    from common.trust.digests import canonical_json
    from server.registry import Registry
    from server.zindex import ZColumn

    Registry.init(root, base_fingerprint=FP, module_shapes={MODULE: SHAPE}, embedding_dim=d).close()
    col = ZColumn(root / "z.f32")
    rng = np.random.default_rng(0)
    ts = "2026-12-01T00:00:00.000000Z"
    old_path = old / "records.jsonl" if old else Path(os.devnull)
    with open(root / "records.jsonl", "w") as out, open(old_path, "w") as ob:
        for s in range(0, n, 5000):
            Z = rng.standard_normal((min(n, s + 5000) - s, d), dtype=np.float32)
            col.append(Z)
            for j, z in enumerate(Z):
                i = s + j
                meta = {**_meta(i), "rank": 2, "created_at": ts, "extra": {}, "privacy": "none", "token_count": None}
                e = {
                    "op": "add",
                    "id": f"{meta['site']}:report-text:{i:016x}",
                    "blob_sha256": "ab" * 32,
                    "bytes": 776,
                    "z_sha256": hashlib.sha256(z.tobytes()).hexdigest(),
                    "meta": meta,
                    "ts": ts,
                }
                out.write(canonical_json({**e, "row": i}) + "\n")
                if old:
                    ob.write(canonical_json({**e, "z_b64": base64.b64encode(z.tobytes()).decode()}) + "\n")
    col.close()
    if old:
        for name in ("registry.json", "audit.jsonl"):
            shutil.copy(root / name, old / name)
        (old / "blobs").mkdir(exist_ok=True)
    first, last = f"{_meta(0)['site']}:report-text:{0:016x}", f"{_meta(n - 1)['site']}:report-text:{n - 1:016x}"
    for reg in (root, old) if old else (root,):
        bind(reg, n, first, last)


def bind(root: Path, n: int, first: str, last: str) -> None:
    """The audit entry that binds the written lines, as ``add_many`` writes it (a record is live iff
    an audit entry binds it: without one, opening would roll the lines back as an unfinished add)."""
    from server.audit import AuditLog

    records = root / "records.jsonl"
    h = hashlib.sha256()
    with open(records, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    AuditLog(root / "audit.jsonl").append(
        "registry.bulk_add",
        count=n,
        first_id=first,
        last_id=last,
        records_span=[0, records.stat().st_size],
        records_span_sha256=h.hexdigest(),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--workdir", default="/tmp/rpe-bench")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from server.registry import Registry

    root, old = Path(a.workdir) / "reopen-new", Path(a.workdir) / "reopen-old"
    for p in (root, old):
        shutil.rmtree(p, ignore_errors=True)
    old.mkdir(parents=True)
    res: dict[str, object] = {"n": a.n, "dim": a.dim, "load_start": os.getloadavg()}
    build(root, a.n, a.dim, None if a.no_baseline else old)
    log("registry_reopen: built")
    times, closes = [], []
    for _ in range(4):  # the first open replays records.jsonl; its close writes the columns snapshot
        t = now()
        reg = Registry(root)
        times.append(now() - t)
        assert len(reg) == a.n, f"{len(reg)} records opened, {a.n} written"
        t = now()
        reg.close()
        closes.append(now() - t)
    res["t_reopen_replay"], res["t_close_first"], res["t_reopen"] = times[0], closes[0], times[1:]
    log(
        f"registry_reopen: full replay {times[0]:.3f} s (close writing the snapshot {closes[0]:.3f} s); "
        f"reopen from the snapshot {[f'{x:.3f}' for x in times[1:]]} s"
    )
    if not a.no_baseline:
        t = now()
        reg = Registry(old, read_only=True)
        res["t_reopen_b64"] = now() - t
        assert len(reg) == a.n, f"{len(reg)} base64 records opened, {a.n} written"
        reg.close()
        log(f"registry_reopen: base64 JSONL reopen {res['t_reopen_b64']:.1f} s")
    res["load_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(res, indent=1))
    for p in (root, old):
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
