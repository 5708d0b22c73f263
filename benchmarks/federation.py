"""Area 4: federation overhead of an enrolment (bytes on the wire, wall time vs local training).

A short, real enrolment run: the repository's ServerApp ``main`` (``mode=enroll``) and ClientApp
handlers with the real SmolLM2-135M base model and real report data, for N simulated sites, over
an in-process Grid. The Grid does what the network would do to every message: it serialises it
with Flower's own protobuf serde (``message_to_proto``), parses it back and delivers the copy, so
the serialisation cost is part of the measured wall time and every byte count is Flower's. The
SuperLink hop (gRPC, TLS) and the SuperNode's process-per-message start are *not* included.

Figures:

* bytes per enrol reply: ``message_to_proto(reply).ByteSize()`` (the whole Message) and the sum
  of Flower 1.41's transport objects (``Message`` deflated into RecordDict / ArrayRecord / Array /
  5 MB ArrayChunk objects, each pushed separately), against the raw adapter tensors (float32 on
  the wire) + z. Also against the canonical blob the registry stores (``adapter_to_bytes``).
* wall time of the whole enrol run vs the sum of the sites' own training seconds
  (``train_stats.seconds`` in each reply), with the rest broken down.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.util import Goal, Section, fmt, log, mib, now, ratio, table

GROUPS = ["ct-head", "mr-head", "ct-abdomen", "ct-thorax", "mr-spine", "xray-chest"]
QUICK = {"sites": 3, "train_examples": 12, "steps": 4, "batch_size": 4, "max_length": 128}
FULL = {"sites": 4, "train_examples": 24, "steps": 8, "batch_size": 4, "max_length": 192}


class SerdeGrid:
    """A Grid that delivers each message to the site's ClientApp in this process, after a protobuf
    round trip of the request and of the reply (what a network hop does to it)."""

    def __init__(self, contexts: dict[int, Any], run_id: int) -> None:
        self.contexts = contexts
        self.run = SimpleNamespace(run_id=run_id)
        self.replies: dict[str, Any] = {}
        self.log: list[dict[str, Any]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    @staticmethod
    def _round_trip(message: Any) -> tuple[bytes, Any]:
        """The message's protobuf bytes and the message parsed back from them (one network hop)."""
        from flwr.common import serde
        from flwr.proto.message_pb2 import Message as ProtoMessage

        data = serde.message_to_proto(message).SerializeToString()
        proto = ProtoMessage()
        proto.ParseFromString(data)
        return data, serde.message_from_proto(proto)

    def push_messages(self, messages: Any) -> list[str]:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        from client.app import app as client_app

        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            t0 = now()
            req_bytes, delivered = self._round_trip(msg)
            t1 = now()
            reply = client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            t2 = now()
            reply_bytes, back = self._round_trip(reply)
            t3 = now()
            transport = None
            if reply.has_content():
                try:
                    transport = sum(len(o.deflate()) for o in get_all_nested_objects(reply).values())
                except Exception:  # noqa: BLE001 - only a figure
                    transport = None
            self.log.append(
                {
                    "type": msg.metadata.message_type,
                    "node": msg.metadata.dst_node_id,
                    "request_bytes": len(req_bytes),
                    "reply_bytes": len(reply_bytes),
                    "reply_transport_bytes": transport,
                    "handler_s": t2 - t1,
                    "serde_s": (t1 - t0) + (t3 - t2),
                    "ok": not reply.has_error(),
                    "reply": reply,
                }
            )
            self.replies[mid] = back
            ids.append(mid)
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _site_data(root: Path, n_sites: int, n_train: int) -> dict[str, Path]:
    from common.families.report.data import report_groups, write_jsonl

    groups = report_groups()
    out = {}
    for i in range(n_sites):
        group = GROUPS[i % len(GROUPS)]
        site = f"site-{chr(ord('a') + i)}"
        write_jsonl(root / site / "train.jsonl", groups[group][:n_train])
        out[site] = root / site
    return out


def _raw_sizes(reply: Any) -> dict[str, int]:
    """Raw tensor bytes in an enrol reply: adapter factors (as sent: float32) and z."""
    from common.adapters import adapter_to_bytes
    from common.protocol import wire

    payload = wire.parse_enroll_reply(reply.content)
    adapter_bytes = sum(a.nbytes for a in payload.arrays.values())
    adapter = wire.adapter_from_wire(payload.arrays, payload.lora_config, payload.meta["base_fingerprint"])
    meta_bytes = sum(len(str(k)) + len(str(v)) for k, v in payload.meta.items())
    return {
        "adapter": adapter_bytes,
        "z": payload.z.nbytes,
        "blob": len(adapter_to_bytes(adapter)),
        "meta_chars": meta_bytes,
        "params": sum(a.size for a in payload.arrays.values()),
    }


def run(quick: bool, workdir: Path) -> Section:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.models import ensure_smollm2
    from server.app import main

    cfg = QUICK if quick else FULL
    sec = Section("federation", "4. Federation overhead of an enrolment")
    root = workdir / "federation"
    shutil.rmtree(root, ignore_errors=True)
    data = _site_data(root / "data", cfg["sites"], cfg["train_examples"])
    model_dir = ensure_smollm2()
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        rc = {
            "mode": "enroll",
            "registry-dir": str(root / "registry"),
            "base-model": str(model_dir),
            "chroma": "off",
            "steps": cfg["steps"],
            "batch-size": cfg["batch_size"],
            "max-length": cfg["max_length"],
            "lora-r": 8,
            "lora-alpha": 16.0,
            "lora-targets": "q_proj,v_proj",
            "require-signatures": False,
        }
        contexts = {}
        for i, (site, path) in enumerate(sorted(data.items()), start=101):
            nc = {
                "site-id": site,
                "data-path": str(path),
                "model-path": str(model_dir),
                "site-dir": str(root / "sites" / site),
            }
            contexts[i] = Context(run_id=1, node_id=i, node_config=nc, state=RecordDict(), run_config=rc)
        grid = SerdeGrid(contexts, run_id=1)
        log(f"federation: in-process enrol run of {cfg['sites']} sites ({cfg['steps']} steps each, real SmolLM2)")
        t = now()
        main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc))
        wall = now() - t
        report = json.loads((root / "registry" / "runs" / "1-enroll.json").read_text())
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old

    enroll = report.get("enroll", {})
    accepted = {s: r for s, r in enroll.items() if r.get("status") == "accepted"}
    train_s = {s: float(r["train_stats"]["seconds"]) for s, r in accepted.items()}
    rows, per_site = [], []
    replies = [e for e in grid.log if e["type"] == "train" and e["ok"]]
    for e in replies:
        raw = _raw_sizes(e["reply"])
        site = e["reply"].content["meta"]["site"]
        raw_total = raw["adapter"] + raw["z"]
        item = {
            "site": site,
            **raw,
            "proto": e["reply_bytes"],
            "transport": e["reply_transport_bytes"],
            "ratio_proto": e["reply_bytes"] / raw_total,
            "ratio_transport": (e["reply_transport_bytes"] / raw_total) if e["reply_transport_bytes"] else None,
            "ratio_blob": e["reply_bytes"] / (raw["blob"] + raw["z"]),
            "handler_s": e["handler_s"],
            "serde_s": e["serde_s"],
            "train_s": train_s.get(site),
        }
        per_site.append(item)
        rows.append(
            [
                site,
                f"{raw['params']:,}",
                mib(raw["adapter"]),
                f"{raw['z']:,} B",
                mib(e["reply_bytes"]),
                mib(e["reply_transport_bytes"]) if e["reply_transport_bytes"] else "n/a",
                f"{item['ratio_proto']:.4f}×",
                f"{item['ratio_transport']:.4f}×" if item["ratio_transport"] else "n/a",
                f"{item['ratio_blob']:.4f}×",
                ms_(e["serde_s"]),
            ]
        )
    handler = sum(e["handler_s"] for e in grid.log)
    serde_s = sum(e["serde_s"] for e in grid.log)
    sum_train = sum(train_s.values())
    sec.data = {
        "config": cfg,
        "wall_s": wall,
        "sum_train_s": sum_train,
        "handler_s": handler,
        "serde_s": serde_s,
        "per_site": per_site,
        "statuses": {s: r.get("status") for s, r in enroll.items()},
        "timings": report.get("timings", {}),
        "messages": [{k: v for k, v in e.items() if k != "reply"} for e in grid.log],
    }
    shutil.rmtree(root, ignore_errors=True)

    sec.add(
        f"In-process enrolment run: the real ServerApp `main` (mode=enroll, Chroma off, unsigned) and "
        f"ClientApp handlers, {cfg['sites']} sites with {cfg['train_examples']} real reports each "
        f"(groups {', '.join(GROUPS[: cfg['sites']])}), SmolLM2-135M, LoRA r=8 on q/v of all 30 layers, "
        f"{cfg['steps']} steps × batch {cfg['batch_size']}. Every request and reply takes a Flower protobuf "
        "round trip (serde) on its way; the gRPC/TLS hop through a SuperLink and the SuperNode's "
        "process-per-message start are not part of this figure. Site statuses: "
        + ", ".join(f"{s} {r.get('status')}" for s, r in sorted(enroll.items()))
        + ".",
        "",
        "**Bytes per enrolment reply** (raw = adapter tensors as sent, float32, + z float32; blob = the "
        "canonical safetensors blob the registry stores)",
        "",
    )
    sec.add(
        *table(
            [
                "site",
                "LoRA params",
                "raw adapter",
                "z",
                "Message protobuf",
                "Flower 1.41 transport objects",
                "protobuf / raw",
                "transport / raw",
                "protobuf / (blob + z)",
                "serde ms (req + reply)",
            ],
            rows,
        )
    )
    other = wall - handler - serde_s
    sec.add(
        "**Wall time of the enrol run vs the sites' own training time**",
        "",
    )
    sec.add(
        *table(
            ["", "seconds", "share of wall"],
            [
                ["whole run (`main`, discovery + enrol + registry)", fmt(wall), "100 %"],
                ["Σ site training (`train_stats.seconds`)", fmt(sum_train), f"{100 * sum_train / wall:.1f} %"],
                [
                    "Σ site handlers beyond training (model load, z, save, checks)",
                    fmt(handler - sum_train),
                    f"{100 * (handler - sum_train) / wall:.1f} %",
                ],
                ["Σ protobuf serde (all messages)", fmt(serde_s), f"{100 * serde_s / wall:.2f} %"],
                ["coordinator (parse, validate, registry add, reports)", fmt(other), f"{100 * other / wall:.1f} %"],
                ["**wall / Σ training**", ratio(wall / sum_train) if sum_train else "n/a", ""],
            ],
        )
    )
    worst = max((p["ratio_proto"] for p in per_site), default=float("nan"))
    worst_t = max((p["ratio_transport"] or 0.0 for p in per_site), default=float("nan"))
    sec.goals.append(
        Goal(
            "bytes sent per site ≤ 1.05 × (raw adapter + z)",
            "≤ 1.05×",
            f"{worst:.4f}× (protobuf), {worst_t:.4f}× (1.41 transport objects)",
            bool(per_site) and worst <= 1.05 and worst_t <= 1.05,
        )
    )
    sec.goals.append(
        Goal(
            "enrolment wall time vs Σ local training",
            "report",
            (ratio(wall / sum_train) if sum_train else "n/a") + f" (serde {100 * serde_s / wall:.2f} % of wall)",
            None,
            "no numeric goal; in-process run without the SuperLink hop",
        )
    )
    return sec


def ms_(seconds: float) -> str:
    return fmt(seconds * 1000.0)
