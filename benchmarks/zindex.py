"""Issue 14 goals 2–4 on the standalone components in ``server/zindex`` (column file + exact top-k).

One configuration (N, dim) per subprocess (``--worker N DIM``) so each peak RSS is its own. Per
configuration, in the same process and time window:

* reopen: ``ZColumn(path)`` vs parsing the same z as base64 inside JSON lines (today's registry
  format; only where ``--reopen`` allows), plus a full ``verify()``;
* insert: batched ``ZColumn.append`` + ``ExactTopK.add`` (records/s), the PCA fit separately;
* top-8 latency, interleaved query by query: numpy float32 brute force (GEMV + argpartition,
  the baseline) vs ``ExactTopK.search``; recall of both against an exact float64 answer;
* Chroma HNSW (the registry's settings) on a subset of ``--chroma-n`` rows (a full build at this
  size would take longer than the whole run): build rate, query p50, recall@8 — and our search on
  the same subset.

Threads: one (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``). Run:
``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.zindex --out benchmarks/ZINDEX.json``
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.registry import exact_topk, numpy_brute, recall, synth  # noqa: E402

K = 8


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def reopen_figures(Z: np.ndarray, work: Path) -> dict[str, Any]:
    """Column reopen vs base64-in-JSONL parse of the same rows."""
    from server.zindex import ZColumn

    out: dict[str, Any] = {}
    lines = work / "records.jsonl"
    with open(lines, "w") as fh:
        for i, z in enumerate(Z):
            fh.write(
                json.dumps(
                    {
                        "op": "add",
                        "id": f"r{i:08d}",
                        "z_b64": base64.b64encode(z.tobytes()).decode(),
                        "z_sha256": "0" * 64,
                        "meta": {"site": "s", "task": "t"},
                    }
                )
                + "\n"
            )
        fh.flush()
        os.fsync(fh.fileno())
    t = time.perf_counter()
    rows = []
    with open(lines, "rb") as fh:
        for raw in fh:
            e = json.loads(raw)
            rows.append(binascii.a2b_base64(e["z_b64"].encode()))
    M = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), -1)
    out["jsonl_parse_s"] = time.perf_counter() - t
    assert M.shape == Z.shape
    del rows, M
    lines.unlink()
    t = time.perf_counter()
    col = ZColumn(work / "z.f32")
    M = col.matrix()
    out["column_reopen_s"] = time.perf_counter() - t
    assert M.shape == Z.shape
    t = time.perf_counter()
    col.verify()
    out["column_verify_s"] = time.perf_counter() - t
    col.close()
    out["reopen_speedup"] = out["jsonl_parse_s"] / out["column_reopen_s"]
    return out


def chroma_figures(Z: np.ndarray, Q: np.ndarray, work: Path) -> dict[str, Any]:
    import chromadb
    from chromadb.config import Settings

    from server.zindex import ExactTopK

    n = Z.shape[0]
    client = chromadb.PersistentClient(str(work / "chroma"), settings=Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection(
        "lora_l2",
        embedding_function=None,
        configuration={"hnsw": {"space": "l2", "max_neighbors": 48, "ef_construction": 400, "ef_search": 200}},
    )
    t = time.perf_counter()
    for s in range(0, n, 2000):
        col.add(ids=[str(i) for i in range(s, min(n, s + 2000))], embeddings=Z[s : s + 2000])
    build = time.perf_counter() - t
    truth = exact_topk(Z, Q, K)
    ix = ExactTopK(Z.shape[1])
    ix.add(Z)
    tc, to, got_c, got_o = [], [], [], []
    for q in Q:
        s = time.perf_counter()
        res = col.query(query_embeddings=[q], n_results=K, include=["distances"])
        tc.append(time.perf_counter() - s)
        got_c.append(np.asarray([int(i) for i in res["ids"][0]]))
        s = time.perf_counter()
        r, _ = ix.search(q, K, Z)
        to.append(time.perf_counter() - s)
        got_o.append(r)
    return {
        "n": n,
        "build_per_s": n / build,
        "hnsw_p50_ms": _p(tc, 50),
        "hnsw_p95_ms": _p(tc, 95),
        "hnsw_recall": recall(got_c, truth),
        "ours_p50_ms": _p(to, 50),
        "ours_recall": recall(got_o, truth),
    }


def worker(n: int, d: int, queries: int, do_reopen: bool, chroma_n: int, work: Path) -> dict[str, Any]:
    import torch

    from server.zindex import ExactTopK, ZColumn

    torch.set_num_threads(1)
    res: dict[str, Any] = {"n": n, "dim": d, "queries": queries}
    Z, Q = synth(n, d, queries)
    res["rss_data_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    col = ZColumn.create(work / "z.f32", d)
    ix = ExactTopK(d)
    batch = 1000
    t_col = t_ix = 0.0
    for s in range(0, n, batch):
        a = time.perf_counter()
        col.append(Z[s : s + batch])
        b = time.perf_counter()
        ix.add(Z[s : s + batch])
        t_col += b - a
        t_ix += time.perf_counter() - b
    res["insert_column_per_s"] = n / t_col
    res["insert_index_per_s"] = n / t_ix
    res["insert_total_per_s"] = n / (t_col + t_ix)
    M = col.matrix()
    t = time.perf_counter()
    ix.fit_projection(M)
    res["fit_projection_s"] = time.perf_counter() - t
    extra = Z[: min(n, 2000)]
    p2 = ExactTopK(d)  # the same basis, fitted: measures add() with the projection on
    p2._P, p2._mu = ix._P, ix._mu
    p2._Yq = ExactTopK._y_blocks(ix.proj_dim, 0)
    t = time.perf_counter()
    p2.add(extra)
    res["insert_index_fitted_per_s"] = extra.shape[0] / (time.perf_counter() - t)
    del p2
    n2 = np.einsum("ij,ij->i", M, M)
    truth = exact_topk(M, Q, K)
    for q in Q[:3]:  # warm-up
        numpy_brute(M, n2, q, K)
        ix.search(q, K, M)
    tb, to, gb, go = [], [], [], []
    for q in Q:
        s = time.perf_counter()
        gb.append(numpy_brute(M, n2, q, K))
        tb.append(time.perf_counter() - s)
        s = time.perf_counter()
        r, _ = ix.search(q, K, M)
        to.append(time.perf_counter() - s)
        go.append(r)
    res.update(
        brute_p50_ms=_p(tb, 50),
        brute_p95_ms=_p(tb, 95),
        ours_p50_ms=_p(to, 50),
        ours_p95_ms=_p(to, 95),
        brute_recall=recall(gb, truth),
        ours_recall=recall(go, truth),
        search_stats=dict(ix.stats),
    )
    res["speedup_p50"] = res["brute_p50_ms"] / res["ours_p50_ms"]
    col.close()
    del M
    if do_reopen:
        res["reopen"] = reopen_figures(Z, work)
    if chroma_n:
        sub = Z[:chroma_n]
        res["chroma"] = chroma_figures(sub, Q, work)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["load_after"] = os.getloadavg()[0]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, type=int, metavar=("N", "DIM"))
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--reopen", action="store_true")
    ap.add_argument("--chroma-n", type=int, default=0)
    ap.add_argument(
        "--configs",
        default="100000x4096:reopen:20000,1000000x576::20000",
        help="N x DIM[:reopen][:CHROMA_N], comma separated",
    )
    ap.add_argument("--out", default="benchmarks/ZINDEX.json")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    if a.worker:
        work = Path(a.workdir or tempfile.mkdtemp(prefix="zindex-"))
        try:
            print(json.dumps(worker(a.worker[0], a.worker[1], a.queries, a.reopen, a.chroma_n, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    results = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for spec in a.configs.split(","):
        parts = spec.split(":")
        n, d = (int(x) for x in parts[0].split("x"))
        cmd = [sys.executable, "-m", "benchmarks.zindex", "--worker", str(n), str(d), "--queries", str(a.queries)]
        if len(parts) > 1 and parts[1] == "reopen":
            cmd.append("--reopen")
        if len(parts) > 2 and parts[2]:
            cmd += ["--chroma-n", parts[2]]
        t = time.perf_counter()
        load = os.getloadavg()[0]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            results.append({"config": spec, "error": out.stderr[-3000:]})
        else:
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(config=spec, wall_s=time.perf_counter() - t, load_before=load)
            results.append(r)
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
