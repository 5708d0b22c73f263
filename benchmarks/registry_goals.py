"""Issue 14 goals 2–4 for the registry, each against a baseline run in the same process.

One registry of N × 4096 (``benchmarks.registry.synth``: 80 % clustered, 20 % isotropic z):

* goal 4, insert: ``add_many`` batches of 5,000 (first 1,000 items with distinct blobs, the rest
  sharing one), the full durable path (blobs, z column, records, audit; the Chroma mirror deferred).
  Baseline: Chroma ``collection.add`` of the same vectors (registry HNSW settings) on a subset;
* goal 2, reopen: ``Registry(path)`` (default configuration, embedded Chroma configured) after the
  search state was persisted, and its first query. Baseline: the same registry rewritten in the
  format before the z column (z as base64 in records.jsonl), opened read-only by today's code
  (the old parse path);
* goal 3, exact top-8: ``Registry.query`` (``auto``: ExactTopK) vs numpy float32 brute force (one
  GEMV + argpartition), interleaved query by query, recall against an exact float64 brute force;
  Chroma HNSW latency and recall on the insert-baseline subset.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.registry_goals --n 100000 --out benchmarks/REGISTRY_GOALS.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.registry import FP, K, MODULE, SHAPE, _adapters, _meta, _stats, exact_topk, numpy_brute, recall, synth  # noqa: E402,I001
from benchmarks.util import Goal, Section, apply_threads, log, now, ratio  # noqa: E402

BATCH = 5000


def _old_format_copy(src: Path, dst: Path, dim: int) -> None:
    """``dst``: registry ``src`` as written before the z column (z_b64 in each add line)."""
    from common.trust.digests import canonical_json

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("z.f32", "z.f32.crc", "zindex.npz", "chroma", ".lock"))
    M = np.memmap(src / "z.f32", dtype="<f4", mode="r", offset=4096).reshape(-1, dim)
    with open(src / "records.jsonl", "rb") as fh, open(dst / "records.jsonl", "w") as out:
        for raw in fh:
            e = json.loads(raw)
            if e["op"] == "add":
                e["z_b64"] = base64.b64encode(np.ascontiguousarray(M[e.pop("row")]).tobytes()).decode()
            out.write(canonical_json(e) + "\n")
    del M


def worker(n: int, d: int, n_queries: int, chroma_n: int, workdir: Path, baseline_reopen: bool) -> dict[str, Any]:
    import chromadb
    from chromadb.config import Settings

    from server.registry import COLLECTION, HNSW_CONFIG, Registry
    from server.registry.snapshot import SNAP_NAME

    res: dict[str, Any] = {"n": n, "dim": d, "queries": n_queries, "load_start": os.getloadavg()}
    root = workdir / f"goals-{n}-{d}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    wlog = lambda m: log(f"registry goals N={n:,} d={d}: {m}")  # noqa: E731
    Z, Q = synth(n, d, n_queries + 3, seed=n + d)

    # ---- goal 4: insert ---------------------------------------------------------------------------
    reg = Registry.init(root / "reg", base_fingerprint=FP, module_shapes={MODULE: SHAPE}, embedding_dim=d)
    n_blob = min(n, 1000)
    distinct, shared = _adapters(n_blob, seed=1), _adapters(1, seed=2)[0]
    ids: list[str] = []
    t = now()
    for s in range(0, n, BATCH):
        e = min(n, s + BATCH)
        items = [(distinct[i] if i < n_blob else shared, Z[i], _meta(i)) for i in range(s, e)]
        ids.extend(r.id for r in reg.add_many(items))
    res["t_insert"] = now() - t
    res["insert_rate"] = n / res["t_insert"]
    wlog(f"add_many: {res['insert_rate']:,.0f} records/s")
    t = now()
    reg.query(Q[0], K)  # builds ExactTopK from the column (the derived state insert defers)
    res["t_first_query_build"] = now() - t
    t = now()
    reg.close()
    res["t_close_persist"] = now() - t
    wlog(f"index build on first query {res['t_first_query_build']:.1f} s, persist {res['t_close_persist']:.1f} s")
    res["insert_plus_index_rate"] = n / (res["t_insert"] + res["t_first_query_build"] + res["t_close_persist"])

    m = min(n, chroma_n)
    client = chromadb.PersistentClient(path=str(root / "alone"), settings=Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection(
        COLLECTION, embedding_function=None, configuration={"hnsw": dict(HNSW_CONFIG)}
    )
    t = now()
    for s in range(0, m, BATCH):
        e = min(m, s + BATCH)
        col.add(ids=[str(i) for i in range(s, e)], embeddings=Z[s:e])
    res["chroma_n"] = m
    res["chroma_insert_rate"] = m / (now() - t)
    wlog(f"Chroma alone add ({m:,}): {res['chroma_insert_rate']:,.0f}/s")

    # ---- goal 2: reopen ------------------------------------------------------------------------------
    t = now()
    reg = Registry(root / "reg")
    res["t_reopen"] = now() - t
    t = now()
    reg.query(Q[1], K)
    res["t_reopen_first_query"] = now() - t
    wlog(f"reopen {res['t_reopen'] * 1000:.0f} ms, first query after it {res['t_reopen_first_query'] * 1000:.0f} ms")

    # ---- goal 3: exact top-8, interleaved with numpy brute force ----------------------------------
    truth = exact_topk(Z, Q[3:], K)
    n2 = np.einsum("ij,ij->i", Z, Z)
    row_of = {rid: i for i, rid in enumerate(ids)}
    for q in Q[:3]:
        reg.query(q, K)
        numpy_brute(Z, n2, q, K)
    t_ours, t_np, r_ours, r_np = [], [], [], []
    for q in Q[3:]:
        t = now()
        hits = reg.query(q, K)
        t_ours.append(now() - t)
        r_ours.append(np.array([row_of[h.record.id] for h in hits]))
        t = now()
        r_np.append(numpy_brute(Z, n2, q, K))
        t_np.append(now() - t)
    res["ours"] = {**_stats(t_ours), "recall": recall(r_ours, truth)}
    res["numpy"] = {**_stats(t_np), "recall": recall(r_np, truth)}
    wlog(
        f"top-8 p50 ours {res['ours']['p50_ms']:.1f} ms (recall {res['ours']['recall']}), numpy "
        f"{res['numpy']['p50_ms']:.1f} ms"
    )
    truth_sub = exact_topk(Z[:m], Q[3:], K)
    t_c, r_c = [], []
    for q in Q[3:]:
        t = now()
        got = col.query(query_embeddings=[q], n_results=K, include=["distances"])["ids"][0]
        t_c.append(now() - t)
        r_c.append(np.array([int(i) for i in got]))
    res["chroma"] = {**_stats(t_c), "recall": recall(r_c, truth_sub)}
    # the same reopen replaying all of records.jsonl (the columns snapshot moved aside)
    snap = root / "reg" / SNAP_NAME
    if snap.exists():
        snap.rename(snap.with_suffix(".hold"))
        t = now()
        with Registry(root / "reg", read_only=True):
            res["t_reopen_replay"] = now() - t
        snap.with_suffix(".hold").rename(snap)
        wlog(f"reopen replaying records.jsonl (no snapshot) {res['t_reopen_replay'] * 1000:.0f} ms")
    reg.close()
    del col, client

    # ---- goal 2 baseline: the old base64-in-JSONL format, opened by today's code ----------------------
    if baseline_reopen:
        _old_format_copy(root / "reg", root / "old", d)
        t = now()
        with Registry(root / "old", read_only=True):
            pass
        res["t_reopen_b64"] = now() - t
        wlog(f"old-format (base64 JSONL) reopen {res['t_reopen_b64']:.1f} s")
    res["load_end"] = os.getloadavg()
    shutil.rmtree(root, ignore_errors=True)
    return res


def report(sec: Section, r: dict[str, Any]) -> None:
    """Add the goal table of one ``worker`` result to ``sec``."""
    n, d = r["n"], r["dim"]
    size = f"{n:,} × {d}"
    load = f"load average {r['load_start'][0]:.1f} → {r['load_end'][0]:.1f}"
    sec.add(
        f"**Issue 14 goals 2–4** ({size}, `python -m benchmarks.registry_goals`, {load}; one thread; "
        f"Chroma on the first {r['chroma_n']:,} vectors):"
    )
    rows = [
        [
            "2. reopen ≤ 1 s",
            f"{r['t_reopen'] * 1000:,.0f} ms (first query after it: {r['t_reopen_first_query'] * 1000:,.0f} ms)",
            "; ".join(
                x
                for x in (
                    f"full replay of records.jsonl (no snapshot) {r['t_reopen_replay'] * 1000:,.0f} ms"
                    if "t_reopen_replay" in r
                    else "",
                    f"base64 JSONL reopen {r['t_reopen_b64']:.1f} s" if "t_reopen_b64" in r else "",
                )
                if x
            )
            or "not run",
            ", ".join(
                x
                for x in (
                    ratio(r["t_reopen_replay"] / r["t_reopen"]) + " vs replay" if "t_reopen_replay" in r else "",
                    ratio(r["t_reopen_b64"] / r["t_reopen"]) + " vs base64" if "t_reopen_b64" in r else "",
                )
                if x
            )
            or "—",
        ],
        [
            "3. exact top-8 p50 ≤ 10 ms, recall 1.0",
            f"{r['ours']['p50_ms']:.1f} ms (p99 {r['ours']['p99_ms']:.1f}), recall {r['ours']['recall']:.3f}",
            f"numpy fp32 {r['numpy']['p50_ms']:.1f} ms (recall "
            f"{r['numpy']['recall']:.3f}); Chroma HNSW {r['chroma']['p50_ms']:.1f} ms "
            f"(recall {r['chroma']['recall']:.3f})",
            ratio(r["numpy"]["p50_ms"] / r["ours"]["p50_ms"]) + " vs numpy",
        ],
        [
            "4. insert ≥ 2,000/s",
            f"{r['insert_rate']:,.0f}/s (with the deferred index build: {r['insert_plus_index_rate']:,.0f}/s)",
            f"Chroma add {r['chroma_insert_rate']:,.0f}/s",
            ratio(r["insert_rate"] / r["chroma_insert_rate"]),
        ],
    ]
    from benchmarks.util import table

    sec.add(*table(["goal", "ours", "baseline (same run)", "ratio"], rows))
    sec.goals.append(
        Goal(
            f"registry reopen at {size} ≤ 1 s",
            "≤ 1 s",
            f"{r['t_reopen']:.2f} s",
            r["t_reopen"] <= 1.0,
            "columns snapshot (columns.snap) + replay of the lines after it; z memory-mapped from z.f32",
        )
    )
    sec.goals.append(
        Goal(
            f"exact top-8 p50 at {size} ≤ 10 ms",
            "≤ 10 ms",
            f"{r['ours']['p50_ms']:.1f} ms",
            r["ours"]["p50_ms"] <= 10.0 and r["ours"]["recall"] == 1.0,
            f"numpy {r['numpy']['p50_ms']:.1f} ms in the same run",
        )
    )
    sec.goals.append(
        Goal(
            f"insert at {d}-d ≥ 2,000/s",
            "≥ 2,000/s",
            f"{r['insert_rate']:,.0f}/s",
            r["insert_rate"] >= 2000,
            "Chroma mirror deferred; ExactTopK built on the first query",
        )
    )


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    """The goals worker in a subprocess (memory returned afterwards); its result dict."""
    import subprocess

    from benchmarks.util import ROOT

    n = 20_000 if quick else 100_000
    out = workdir / f"registry-goals-{n}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.registry_goals",
        "--n",
        str(n),
        "--out",
        str(out),
        "--workdir",
        str(workdir),
    ]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ANONYMIZED_TELEMETRY": "False"}, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--chroma-n", type=int, default=5000)
    ap.add_argument("--no-baseline-reopen", action="store_true")
    ap.add_argument("--workdir", default="/tmp/rpe-bench")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "REGISTRY_GOALS.json"),
        help="JSON result (default benchmarks/REGISTRY_GOALS.json)",
    )
    a = ap.parse_args()
    apply_threads()
    res = worker(a.n, a.dim, a.queries, a.chroma_n, Path(a.workdir), not a.no_baseline_reopen)
    Path(a.out).write_text(json.dumps(res, default=float, indent=1))


if __name__ == "__main__":
    main()
