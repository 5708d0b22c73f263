"""Hostile and malformed inputs: ONE table of cases, each checked the same way.

Every row builds one bad input, feeds it to the component that must refuse it, and checks:

1. the exception type and a substring of its message that names the problem;
2. ``records.jsonl``, every file under ``blobs/`` and ``chroma/``, ``registry.json`` and the nonce
   ledger ``nonces.jsonl`` are byte-for-byte unchanged (sha256 of every file before/after), and the
   registry's logical state (live ids and their z) is unchanged;
3. ``audit.jsonl`` gained exactly the documented entries: one ``submission.rejected`` entry naming
   the reason for a submission the registry or the coordinator refuses, one ``query.embedding``
   entry where a composition fails *after* the retrieval was logged, nothing for client-side and
   query-side refusals; and the hash chain still verifies.

Chroma note: the snapshots are taken after the registry was built, closed and reopened (so
whatever Chroma writes on open is already there). Rejections and small (brute-force) queries do
not touch Chroma at all, so ``chroma/`` is compared byte-for-byte like the rest.

Registry-side rows run against one shared, small synthetic registry (base = 2 layers x
q_proj/v_proj of 32x32, z of dimension 16, tight size limits, four valid records). Rows marked
as known gaps (``gap=``: ``xfail(strict=True)``; none at present) run against a throwaway copy,
so a bad record such a row gets accepted cannot leak into the other rows. Coordinator rows run the real enrolment
code (``server.app.run_enroll`` / ``embed_sites`` / ``run_compose``) behind an in-process fake
Flower grid that answers with a crafted reply.

``docs/HOSTILE_INPUTS.md`` is generated from a real run of this file::

    .venv/bin/python tests/unit/test_hostile.py          # runs these tests, rewrites the doc
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as a script (doc generation)
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:  # ... and tests/, for `support` (pytest puts it there itself)
    sys.path.insert(0, str(ROOT / "tests"))

from support.grid import FakeGrid  # noqa: E402

from client.app import SiteError  # noqa: E402
from client.handlers import DeliveryRefused  # noqa: E402
from client.policy import ReleaseRefused  # noqa: E402
from common.adapters import (  # noqa: E402
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    adapter_to_bytes,
    load_peft_adapter,
    peft_key,
    save_peft_adapter,
)
from common.embedding import EmptyDatasetError, mean_embedding  # noqa: E402
from common.families.report.data import DatasetFormatError, read_jsonl  # noqa: E402
from common.protocol import wire  # noqa: E402
from common.protocol.wire import WireError  # noqa: E402
from common.trust import signing  # noqa: E402
from common.trust.signing import (  # noqa: E402
    ReplayError,
    SignatureError,
    StaleSubmissionError,
    UnknownSiteError,
)
from server import allowlist  # noqa: E402
from server.allowlist import AllowList, NonceLedger  # noqa: E402
from server.audit import verify as verify_audit  # noqa: E402
from server.composer import CompositionError, compose_for_target  # noqa: E402
from server.messaging import IdentityRefused  # noqa: E402
from server.registry import (  # noqa: E402
    AdapterFormatError,
    AdapterMeta,
    BlobHashMismatchError,
    DtypeError,
    DuplicateRecordError,
    EmbeddingDimensionError,
    MetadataError,
    NonFiniteError,
    NormError,
    NotEnoughRecordsError,
    PayloadTooLargeError,
    QueryError,
    RankError,
    RecordNotFoundError,
    Registry,
    ShapeMismatchError,
    UnknownBaseError,
    UnknownModuleError,
)
from server.registry.errors import UpdateNormBoundError  # noqa: E402
from server.strategies import STRATEGIES  # noqa: E402

DOC = ROOT / "docs" / "HOSTILE_INPUTS.md"
DUMP_ENV = "RPE_HOSTILE_DUMP"
BASE = "sha256:" + "b0" * 32
OTHER_BASE = "sha256:" + "0b" * 32
SHAPES = {f"model.layers.{i}.self_attn.{p}": (32, 32) for i in range(2) for p in ("q_proj", "v_proj")}
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DIM = 16
TASK = "xray-chest"
RUN_ID = "run-7"
LIMITS = {"max_rank": 16, "max_blob_bytes": 12_000, "max_modules": 4, "max_meta_bytes": 4096}
#: files whose bytes a rejection must not change (audit.jsonl is checked entry by entry)
DURABLE = ("records.jsonl", "blobs", "chroma", "registry.json", "nonces.jsonl")
REJECTED = "submission.rejected"
QUERY = "query.embedding"
IDENTITY = "identity.refused"


# --------------------------------------------------------------------------------------------
# synthetic inputs
# --------------------------------------------------------------------------------------------


def make_adapter(
    seed: int = 0,
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    modules: list[str] | None = None,
    shapes: dict | None = None,
    scale: float = 2.0,
) -> LoraAdapter:
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            n: LoraModule(
                torch.randn(rank, shapes[n][1], generator=g).div(8).to(dtype),
                torch.randn(shapes[n][0], rank, generator=g).div(8).to(dtype),
                scale,
            )
            for n in (modules or list(shapes))
        }
    )


def make_z(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def make_meta(**over: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "site": "e",
        "task": TASK,
        "modality": "xray",
        "base_fingerprint": BASE,
        "sample_count": 12,
        "token_count": 300,
        "privacy": "none",
        "extra": {},
    }
    meta.update(over)
    return meta


def unchecked_module(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> LoraModule:
    """A LoraModule holding factors its constructor would refuse (rank 0, A/B rank mismatch)."""
    m = LoraModule(torch.zeros(1, A.shape[1]), torch.zeros(B.shape[0], 1), 1.0)
    m.A, m.B, m.scale = A, B, scale
    return m


def rewrite_header(blob: bytes, edit: Callable[[dict], None]) -> bytes:
    """The blob with its safetensors JSON header edited (tensor bytes untouched)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


def _tag_dtype(tag: str) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        for key, info in header.items():
            if key != "__metadata__":
                info["dtype"] = tag

    return edit


def _nan_scale(header: dict) -> None:
    lora = json.loads(header["__metadata__"]["rpe_lora"])
    lora["modules"][Q0]["scale"] = float("nan")
    header["__metadata__"]["rpe_lora"] = json.dumps(lora, sort_keys=True, separators=(",", ":"))


def stock_safetensors() -> bytes:
    """PEFT-keyed factors saved by plain ``safetensors`` (what ``adapter_model.safetensors`` holds)."""
    from safetensors.torch import save

    a = make_adapter(3)
    return save({peft_key(n, f): getattr(m, f) for n, m in a.modules.items() for f in ("A", "B")})


def _with_module(a: LoraAdapter, name: str, module: LoraModule | None = None) -> LoraAdapter:
    a.modules[name] = module if module is not None else next(iter(a.modules.values()))
    return a


def _respaced(blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    raw = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(", ", ": ")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


def _reordered(blob: bytes) -> bytes:
    """The same tensors and metadata, compact sorted JSON as ours, but the data in reverse order."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    parts, off = [], 0
    for k in reversed(names):
        b, e = header[k]["data_offsets"]
        parts.append(data[b:e])
        header[k]["data_offsets"] = [off, off + e - b]
        off += e - b
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(parts)


def with_value(a: LoraAdapter, name: str, factor: str, index: tuple[int, int], value: float) -> LoraAdapter:
    getattr(a.modules[name], factor)[index] = value
    return a


def scaled(a: LoraAdapter, factor: float) -> LoraAdapter:
    for m in a.modules.values():
        m.B.mul_(factor)
    return a


# --------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------


class Reported(Exception):
    """The coordinator reported a refusal in its run report instead of raising (the run goes on).

    ``cause`` is the exception it caught (captured by spies on the functions it calls), when any.
    """

    def __init__(self, status: str, reason: str, reporter: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.reporter, self.cause = status, reason, reporter, cause


@dataclass
class World:
    """The shared registry and what the cases need to build their inputs."""

    tmp: Path
    root: Path
    reg: Registry
    allowlist: Path
    keys: dict[str, Path]
    first: tuple[LoraAdapter, np.ndarray, dict[str, Any]]  # record 0 as it was submitted
    n_records: int


@dataclass
class Ctx:
    """What a case's callable gets: the registry to attack and helpers for coordinator paths."""

    world: World
    reg: Registry
    root: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    captured: list[BaseException] = field(default_factory=list)

    # -- registry -------------------------------------------------------------------------------
    def add(self, adapter: Any = None, z: Any = None, meta: Any = None, **kw: Any) -> Any:
        return self.reg.add(
            make_adapter(50) if adapter is None else adapter,
            make_z(50) if z is None else z,
            make_meta() if meta is None else meta,
            **kw,
        )

    def compose(self, z: Any = None, **kw: Any) -> Any:
        args: dict[str, Any] = {"strategy": "sim", "k": 2, "task": TASK, "target": "e", **kw}
        return compose_for_target(self.reg, make_z(60) if z is None else z, **args)

    # -- coordinator ------------------------------------------------------------------------------
    def _spy(self, owner: Any, name: str) -> None:
        fn = getattr(owner, name)
        sink = self.captured

        def spy(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                sink.append(exc)
                raise

        self.monkeypatch.setattr(owner, name, spy)

    def _flower_task(self) -> None:
        """Flower messages need a task identity (the SuperLink sets it in a real run)."""
        from flwr.supercore.task_identity import TaskIdentity

        for name in ("_run_id", "_node_id", "_task_id"):
            self.monkeypatch.setattr(TaskIdentity, name, 1)

    def _cause(self, reason: str) -> BaseException | None:
        for exc in reversed(self.captured):
            if reason in (f"{type(exc).__name__}: {exc}", f"invalid embedding reply: {exc}", str(exc)):
                return exc
        return None

    def settings(self, **kw: Any) -> Any:
        from server.app import Settings

        # the enrolment rows send unsigned replies unless they test signing (require-signatures is on by default)
        kw.setdefault("require_signatures", False)
        return Settings(registry_dir=str(self.root), allowlist=str(self.world.allowlist), chroma="off", **kw)

    def sites(self, *names: str) -> dict[str, Any]:
        from server.app import SiteInfo

        return {s: SiteInfo(s, 101 + i, {}) for i, s in enumerate(names)}

    def enroll(
        self, build: Callable[[str], Any], site: str = "a", online: tuple[str, ...] = ("a", "b"), **settings: Any
    ) -> dict[str, Any]:
        """Run the coordinator's real enrolment for one site whose reply is ``build(nonce)``."""
        from server import app

        self._flower_task()
        self._spy(wire, "parse_enroll_reply")
        self._spy(allowlist, "authenticate_submission")
        self._spy(self.reg, "add")
        grid = FakeGrid(lambda msg: build(msg.content["config"]["nonce"]))
        report: dict[str, Any] = {}
        settings.setdefault("task", TASK)  # the request's task; a reply for another task is refused (issue 26)
        app.run_enroll(grid, self.settings(sites=[site], **settings), self.reg, self.sites(*online), RUN_ID, report)
        res = report["enroll"][site]
        if res["status"] == "accepted":
            return res
        raise Reported(res["status"], res["reason"], "server/app.py:run_enroll", self._cause(res["reason"]))

    def embed(self, build: Callable[[str], Any], target: str = "a", online: tuple[str, ...] = ("a", "b")) -> Any:
        """Run the coordinator's real ``query.embed`` round for one target."""
        from server import app

        self._flower_task()
        self._spy(wire, "parse_embed_reply")
        grid = FakeGrid(lambda msg: build(msg.content["config"]["nonce"]))
        problems: dict[str, str] = {}
        zs = app.embed_sites(grid, self.settings(), self.reg, self.sites(*online), [target], RUN_ID, problems)
        if target in zs:
            return zs[target]
        raise Reported("failed", problems[target], "server/app.py:embed_sites", self._cause(problems[target]))

    def run_compose(self, target: str, online: tuple[str, ...] = ("a", "b")) -> Any:
        from server import app

        self._flower_task()
        report: dict[str, Any] = {}
        app.run_compose(
            FakeGrid(lambda msg: None),
            self.settings(targets=[target], k=2),
            self.reg,
            self.sites(*online),
            RUN_ID,
            report,
        )
        res = report["compose"][target]
        if res["status"] == "delivered":
            return res
        raise Reported(res["status"], res["reason"], "server/app.py:run_compose")

    # -- wire replies -----------------------------------------------------------------------------
    def enroll_parts(
        self, nonce: str, site: str = "a", adapter: LoraAdapter | None = None, z: Any = None, **meta_over: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
        """(arrays, z, meta) of a valid enrolment reply, exactly as ``client.app._enroll`` builds it."""
        norm = wire.wire_normalized(adapter or make_adapter(70), base_model=BASE)
        arrays, lora_config = wire.adapter_to_wire(norm)
        z = make_z(70) if z is None else np.asarray(z, dtype=np.float32)
        meta: dict[str, Any] = {
            "schema": wire.WIRE_SCHEMA,
            "site": site,
            "task": TASK,
            "modality": "xray",
            "group": "xray-chest",
            "base_fingerprint": BASE,
            "sample_count": 12,
            "token_count": 345,
            "lora_config": wire.canonical_json(lora_config),
            "blob_sha256": hashlib.sha256(adapter_to_bytes(norm)).hexdigest(),
            "embedding_spec": wire.canonical_json({"representation": "hidden-mean", "layer": -1, "dim": int(z.size)}),
            "privacy": wire.canonical_json({"dp_sgd": False}),
            "train_stats": wire.canonical_json({"steps": 2}),
            "nonce": nonce,
            "created_at": 1_700_000_000.5,
            "signer": "",
            "signature": "",
        }
        meta.update(meta_over)
        return arrays, z, meta

    def sign(self, meta: dict[str, Any], z: np.ndarray, key_site: str) -> dict[str, Any]:
        key = signing.load_private_key(self.world.keys[key_site])
        signed = {k: v for k, v in meta.items() if k not in ("signer", "signature")}
        meta["signer"] = signing.key_fingerprint(key.public_key())
        meta["signature"] = signing.sign_submission(key, meta["blob_sha256"], z, signed, RUN_ID, meta["nonce"])
        return meta

    @staticmethod
    def content(
        arrays: dict[str, np.ndarray], z: np.ndarray, meta: dict[str, Any], raw: bool = False, **extra_records: Any
    ) -> Any:
        """The reply RecordDict; ``raw`` packs the arrays in their own dtype (no float32 cast)."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

        def arr(x: np.ndarray) -> Any:
            return Array.from_numpy_ndarray(np.ascontiguousarray(x))

        adapter = (
            ArrayRecord({wire.PACKED_KEY: arr(np.concatenate([arrays[k].ravel() for k in sorted(arrays)]))})
            if raw
            else wire.adapter_record(arrays)
        )
        return RecordDict(
            {"adapter": adapter, "embedding": ArrayRecord({"z": arr(z)}), "meta": ConfigRecord(meta), **extra_records}
        )

    def reply(
        self, nonce: str, sign_as: str | None = None, after_signing: dict[str, Any] | None = None, **meta_over: Any
    ) -> Any:
        arrays, z, meta = self.enroll_parts(nonce, **meta_over)
        if sign_as:
            self.sign(meta, z, sign_as)
        meta.update(after_signing or {})
        return self.content(arrays, z, meta)

    def embed_reply(self, nonce: str, **meta_over: Any) -> Any:
        from flwr.app import ConfigRecord, RecordDict

        z = make_z(80)
        meta: dict[str, Any] = {
            "schema": wire.WIRE_SCHEMA,
            "site": "a",
            "task": "report-text",
            "base_fingerprint": BASE,
            "sample_count": 5,
            "token_count": 100,
            "embedding_spec": wire.canonical_json({"representation": "hidden-mean", "layer": -1, "dim": DIM}),
            "privacy": wire.canonical_json({}),
            "nonce": nonce,
        }
        meta.update(meta_over)
        return RecordDict({"embedding": wire.embedding_record(z), "meta": ConfigRecord(meta)})

    # -- files ------------------------------------------------------------------------------------
    def peft_dir(
        self, config_over: dict[str, Any] | None = None, extra_tensors: dict | None = None, drop: tuple[str, ...] = ()
    ) -> Path:
        from safetensors.torch import load_file, save_file

        d = save_peft_adapter(make_adapter(90), self.tmp / "peft", "tiny-base")
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(config_over or {})
        for key in drop:
            cfg.pop(key, None)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        if extra_tensors:
            tensors = load_file(str(d / "adapter_model.safetensors"))
            tensors.update(extra_tensors)
            save_file(tensors, str(d / "adapter_model.safetensors"))
        return d

    def jsonl(self, text: str) -> Path:
        p = self.tmp / "site-data.jsonl"
        p.write_text(text, encoding="utf-8")
        return p


# --------------------------------------------------------------------------------------------
# coordinator-side inputs (functions, so the table stays one line per case)
# --------------------------------------------------------------------------------------------


def _float64_arrays(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        return c.content({k: v.astype(np.float64) for k, v in arrays.items()}, z, meta, raw=True)

    return c.enroll(build)


def _extra_tensor(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        arrays["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)
        return c.content(arrays, z, meta)

    return c.enroll(build)


def _per_factor_arrays(c: Ctx) -> Any:
    from flwr.app import Array, ArrayRecord

    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        content = c.content(arrays, z, meta)
        content["adapter"] = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in sorted(arrays.items())})
        return content

    return c.enroll(build)


def _wrong_array_shape(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        key = peft_key(Q0, "B")
        arrays[key] = np.zeros((32, 3), np.float32)  # B of rank 3, the config says 4
        return c.content(arrays, z, meta)

    return c.enroll(build)


def _nan_array(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        arrays[peft_key(Q0, "A")] = arrays[peft_key(Q0, "A")].copy()
        arrays[peft_key(Q0, "A")][0, 0] = np.nan
        return c.content(arrays, z, meta)

    return c.enroll(build)


def _extra_record(c: Ctx) -> Any:
    from flwr.app import ConfigRecord

    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        return c.content(arrays, z, meta, raw_reports=ConfigRecord({"text": "Findings: ..."}))

    return c.enroll(build)


def _missing_meta_key(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        del meta["sample_count"]
        return c.content(arrays, z, meta)

    return c.enroll(build)


def _z_vs_spec(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        return c.content(arrays, np.concatenate([z, z[:2]]), meta)  # 18 values, the spec says 16

    return c.enroll(build)


def _lora_config_extra_field(c: Ctx) -> Any:
    def build(nonce: str) -> Any:
        arrays, z, meta = c.enroll_parts(nonce)
        cfg = json.loads(meta["lora_config"])
        cfg["use_dora"] = True
        meta["lora_config"] = wire.canonical_json(cfg)
        return c.content(arrays, z, meta)

    return c.enroll(build)


def _replayed_reply(c: Ctx) -> Any:
    old = allowlist.make_nonce(time.time() - 60)
    return c.enroll(lambda nonce: c.reply(old, sign_as="a"))


def _replayed_nonce(c: Ctx) -> Any:
    ledger = NonceLedger(c.tmp / "ledger.jsonl")
    nonce = allowlist.make_nonce()
    _, z, meta = c.enroll_parts(nonce)
    c.sign(meta, z, "a")
    signed = {k: v for k, v in meta.items() if k not in ("signer", "signature")}
    args = (AllowList(c.world.allowlist), ledger, "a", meta["signature"], meta["blob_sha256"], z, signed, RUN_ID, nonce)
    allowlist.authenticate_submission(*args)  # the genuine submission
    allowlist.authenticate_submission(*args)  # the same bytes again


def _stale_nonce(c: Ctx) -> Any:
    nonce = allowlist.make_nonce(time.time() - 3 * 24 * 3600)
    _, z, meta = c.enroll_parts(nonce)
    c.sign(meta, z, "a")
    signed = {k: v for k, v in meta.items() if k not in ("signer", "signature")}
    allowlist.authenticate_submission(
        AllowList(c.world.allowlist),
        NonceLedger(c.tmp / "ledger.jsonl"),
        "a",
        meta["signature"],
        meta["blob_sha256"],
        z,
        signed,
        RUN_ID,
        nonce,
    )


def _empty_dataset_embedding(c: Ctx) -> Any:
    examples = read_jsonl(c.jsonl("\n\n"))  # an empty (blank-lines-only) dataset file
    return mean_embedding(None, None, [e.prompt for e in examples])


def _empty_dataset_enroll(c: Ctx) -> Any:
    from client.app import Site, _enroll

    site = Site("a", c.jsonl(""), "unused-model", c.tmp / "site-a")
    return _enroll(wire.Request(wire.ENROLL, {"nonce": allowlist.make_nonce(), "task": "report-text"}), site, None)


# -- identity, delivery and release policy (issue 10 items 2 and 3) ---------------------------
def _whoami_reply(nonce: str, site: str = "a", identity: str = "") -> Any:
    return wire.build_whoami_reply(
        {
            "schema": wire.WIRE_SCHEMA,
            "site": site,
            "tasks": '["report-text"]',
            "groups": '["xray-chest"]',
            "n_examples": 12,
            "n_labeled": 12,
            "n_unlabeled": 0,
            "n_eval": 0,
            "data_ok": True,
            "signer": "",
            "nonce": nonce,
            "identity": identity,
        }
    )


def _identity(c: Ctx, key_site: str, challenge: str, run_id: str = RUN_ID, node: int = 7, site: str = "a") -> str:
    from common.trust.statements import sign_statement

    key = signing.load_private_key(c.world.keys[key_site])
    body = {"site": site, "run_id": run_id, "challenge": challenge, "node_id": str(node)}
    return wire.canonical_json(sign_statement(key, "identity", body))


def _discover(c: Ctx, identity: Callable[[str], str], require: bool = True) -> Any:
    """Run the coordinator's real discovery against one node (7) whose whoami claims site a."""
    from server import messaging

    class OneNode(FakeGrid):
        def get_node_ids(self) -> list[int]:
            return [7]

    c._flower_task()
    c._spy(messaging, "verify_identity")
    grid = OneNode(
        lambda msg: _whoami_reply(msg.content["config"]["nonce"], "a", identity(msg.content["config"]["challenge"]))
    )
    report: dict[str, Any] = {}
    sites = messaging.discover(grid, 5.0, report, RUN_ID, AllowList(c.world.allowlist), require, c.reg.audit)
    if "a" in sites:
        return sites["a"]
    reason = report["discovery_problems"]["node 7"]
    raise Reported("refused", reason, "server/messaging.py:discover", c._cause(reason))


def _impostor_node(c: Ctx) -> Any:
    return _discover(c, lambda ch: _identity(c, "b", ch))  # site a's id, b's key


def _unsigned_claim(c: Ctx) -> Any:
    return _discover(c, lambda ch: "")


def _unsigned_claim_signatures_off(c: Ctx) -> Any:
    return _discover(c, lambda ch: "", require=False)  # issue 26 class 7: accepted before


def _replayed_identity(c: Ctx) -> Any:
    captured = _identity(c, "a", "a-challenge-of-an-earlier-run", run_id=RUN_ID)  # genuine, recorded earlier
    return _discover(c, lambda ch: captured)


def _site(c: Ctx, n_train: int = 12, n_eval: int = 0, pin: bool = True) -> Any:
    """A site with ``n_train`` + ``n_eval`` reports, a 3-state model config and (``pin``) a pinned coordinator key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.app import Site

    rows = [
        {"prompt": f"Findings: case {i}.", "target": "Impression: normal.", "group": "xray-chest"}
        for i in range(n_train + n_eval)
    ]
    data = c.tmp / "site-data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    model = c.tmp / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    pub = None
    if pin:
        pub = c.tmp / "coordinator.pub"
        pub.write_text(signing.public_key_pem(Ed25519PrivateKey.generate().public_key()))
    return Site("a", data, str(model), c.tmp / "site-a", coordinator_key=pub)


def _apply_request(**over: Any) -> Any:
    cfg = {
        "nonce": allowlist.make_nonce(),
        "task": "report-text",
        "name": "rpe-sim-k2-run7",
        "lora_config": "{}",
        "blob_sha256": "0" * 64,
        "base_fingerprint": BASE,
        **over,
    }
    return wire.Request(wire.APPLY, cfg)


def _unsigned_delivery(c: Ctx) -> Any:
    from types import SimpleNamespace

    from client.handlers import apply

    return apply(_apply_request(), _site(c), SimpleNamespace(run_id=RUN_ID))


def _foreign_delivery(c: Ctx) -> Any:
    from types import SimpleNamespace

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.handlers import apply
    from server.modes.compose import delivery_statement

    req = _apply_request()
    cfg = req.config
    cfg["delivery"] = delivery_statement(
        Ed25519PrivateKey.generate(), cfg["blob_sha256"], "a", RUN_ID, cfg["name"], cfg["nonce"]
    )
    return apply(req, _site(c), SimpleNamespace(run_id=RUN_ID))


def _evaluate_request(hashes: list[str], **over: Any) -> Any:
    cfg = {"nonce": allowlist.make_nonce(), "task": "report-text", "with_base": True, **over}
    arms = [
        ({"arm": f"arm{i}", "blob_sha256": h, "base_fingerprint": BASE, "lora_config": {}}, {})
        for i, h in enumerate(hashes)
    ]
    return wire.Request(wire.EVALUATE, cfg, arms=arms)


def _unsigned_evaluate(c: Ctx) -> Any:
    from types import SimpleNamespace

    from client.arms import evaluate_arms

    return evaluate_arms(_evaluate_request(["1" * 64, "2" * 64]), _site(c), SimpleNamespace(run_id=RUN_ID))


def _swapped_evaluate(c: Ctx) -> Any:
    """The pinned coordinator really signed arms (h1, h2); the request carries (h2, h1)."""
    from types import SimpleNamespace

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.arms import evaluate_arms
    from server.modes.compose import delivery_statement

    key = Ed25519PrivateKey.generate()
    site = _site(c)
    site.coordinator_key.write_text(signing.public_key_pem(key.public_key()))
    h1, h2 = "1" * 64, "2" * 64
    req = _evaluate_request([h2, h1])
    req.config["delivery"] = delivery_statement(
        key, wire.arms_digest([h1, h2]), "a", RUN_ID, "evaluate", req.config["nonce"]
    )
    return evaluate_arms(req, site, SimpleNamespace(run_id=RUN_ID))


def _overwrite_own(c: Ctx) -> Any:
    from types import SimpleNamespace

    from client.handlers import apply

    return apply(_apply_request(name="own-report-text"), _site(c), SimpleNamespace(run_id=RUN_ID))


def _embed_request(c: Ctx, **over: Any) -> Any:
    from types import SimpleNamespace

    from client.handlers import embed

    req = wire.Request(wire.EMBED, {"nonce": allowlist.make_nonce(), "task": "report-text", **over})
    return embed(req, _site(c), SimpleNamespace(run_id=RUN_ID))


def _metrics_few_reports(c: Ctx) -> Any:
    from client import handlers
    from client.policy import ReleasePolicy

    c._spy(ReleasePolicy, "metrics")
    metrics, evaluated = handlers.score(
        _site(c, n_eval=3), {"evaluate": True, "max_eval": 1, "task": "report-text"}, None
    )
    if metrics or evaluated:
        return metrics
    cause = c.captured[-1] if c.captured else None
    raise Reported("withheld", f"metrics withheld: {cause}", "client/handlers.py:score", cause)


def _bulk_one_bad(c: Ctx) -> Any:
    return c.reg.add_many(
        [
            (make_adapter(51), make_z(51), make_meta(site="e")),
            (make_adapter(52), make_z(52, DIM - 1), make_meta(site="f")),
        ]
    )


def _duplicate(c: Ctx) -> Any:
    adapter, z, meta = c.world.first
    return c.reg.add(adapter, z, {**meta, "sample_count": meta["sample_count"] + 1})


def _rank_zero_object(c: Ctx) -> Any:
    a = make_adapter(53)
    a.modules[Q0] = unchecked_module(torch.zeros(0, 32), torch.zeros(32, 0))
    return c.add(a)


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what the attacker / the broken site sends (doc column)
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    match: str  # substring of the message that names the problem
    audit: tuple[str, ...] = ()  # audit events the refusal appends, in order
    audit_match: str | None = None  # substring the rejection entry's reason must hold (default: match)
    hint: str | None = None  # substring saying what to do / where (remedy, module name, known values)
    gap: str | None = None  # known gap: xfail(strict=True) with this reason
    fix: str | None = None  # suggested fix for the gap (doc)

    @property
    def isolated(self) -> bool:
        return self.gap is not None


R = (REJECTED,)
SEND = "common.adapters.lora.adapter_to_bytes(adapter)"  # the remedy every malformed-blob message names
CASES: list[Case] = [
    # -- adapter tensors against the base ---------------------------------------------------------
    Case(
        "module-not-in-base",
        "adapter targets `model.layers.7.self_attn.q_proj` (base has 2 layers)",
        lambda c: c.add(_with_module(make_adapter(1, modules=[Q0]), "model.layers.7.self_attn.q_proj")),
        UnknownModuleError,
        "'model.layers.7.self_attn.q_proj' does not exist in base",
        R,
        hint="such as 'model.layers.0.self_attn.q_proj'",
    ),
    Case(
        "peft-key-as-module-name",
        "module named by its PEFT key (`base_model.model.…q_proj`)",
        lambda c: c.add(_with_module(make_adapter(1, modules=[V1]), "base_model.model." + Q0)),
        UnknownModuleError,
        "module names are base-model paths",
        R,
    ),
    Case(
        "shape-mismatch",
        "q_proj factors A[4,48] / B[32,4] (base in_features is 32)",
        lambda c: c.add(_with_module(make_adapter(1), Q0, LoraModule(torch.randn(4, 48), torch.randn(32, 4)))),
        ShapeMismatchError,
        "do not fit the base module (out=32, in=32)",
        R,
        hint="was the adapter trained on another base model?",
    ),
    Case(
        "other-base-bytes",
        "canonical blob of an adapter trained on a 64x64 base",
        lambda c: c.add(adapter_to_bytes(make_adapter(2, shapes=dict.fromkeys(SHAPES, (64, 64))))),
        ShapeMismatchError,
        "was the adapter trained on another base model",
        R,
        hint="expected A [r, 32] and B [32, r]",
    ),
    Case(
        "nan-factor",
        "NaN in lora_A (LoraAdapter object)",
        lambda c: c.add(with_value(make_adapter(3), Q0, "A", (1, 2), float("nan"))),
        NonFiniteError,
        "lora_A has 1 non-finite value(s) (NaN)",
        R,
        hint="retrain (lower lr)",
    ),
    Case(
        "inf-factor-bytes",
        "+Inf in lora_B (canonical bytes)",
        lambda c: c.add(adapter_to_bytes(with_value(make_adapter(3), V1, "B", (0, 0), float("inf")))),
        NonFiniteError,
        "lora_B has 1 non-finite value(s) (Inf)",
        R,
        hint="retrain (lower lr)",
    ),
    Case(
        "nan-scale-bytes",
        "scale NaN in the blob's `rpe_lora` metadata",
        lambda c: c.add(rewrite_header(adapter_to_bytes(make_adapter(3)), _nan_scale)),
        AdapterFormatError,
        f"module {Q0}: LoRA scale must be finite, got nan",
        R,
        hint=SEND,
    ),
    Case(
        "dtype-float64",
        "float64 factors (LoraAdapter object)",
        lambda c: c.add(make_adapter(4, dtype=torch.float64)),
        DtypeError,
        "has dtype float64",
        R,
        hint="accepted: float32, bfloat16, float16",
    ),
    Case(
        "dtype-f64-bytes",
        "blob header declares F64 tensors",
        lambda c: c.add(rewrite_header(adapter_to_bytes(make_adapter(4)), _tag_dtype("F64"))),
        DtypeError,
        "has dtype F64",
        R,
        hint="accepted: float32, bfloat16, float16",
    ),
    Case(
        "dtype-int-bytes",
        "blob header declares I32 tensors",
        lambda c: c.add(rewrite_header(adapter_to_bytes(make_adapter(4)), _tag_dtype("I32"))),
        DtypeError,
        "has dtype I32",
        R,
        hint="accepted: float32, bfloat16, float16",
    ),
    Case(
        "oversize-blob",
        "20 kB of bytes (cap 12,000)",
        lambda c: c.add(b"\0" * 20_000),
        PayloadTooLargeError,
        "adapter blob is 20000 bytes, the registry cap is 12000",
        R,
        hint="lower the rank or the number of target modules",
    ),
    Case(
        "oversize-adapter",
        "rank-16 adapter on every module (16 kB of factors, cap 12,000)",
        lambda c: c.add(make_adapter(5, rank=16)),
        PayloadTooLargeError,
        "adapter tensors are 16384 bytes, the registry cap is 12000",
        R,
        hint="lower the rank or the number of target modules",
    ),
    Case(
        "too-many-modules",
        "5 modules (cap 4)",
        lambda c: c.add(_with_module(make_adapter(5, rank=1), "model.layers.2.self_attn.q_proj")),
        PayloadTooLargeError,
        "adapter has 5 modules, the cap is 4",
        R,
    ),
    Case(
        "oversize-metadata",
        "5 kB string in `extra` (cap 4,096)",
        lambda c: c.add(meta=make_meta(extra={"notes": "x" * 5000})),
        PayloadTooLargeError,
        "the cap is 4096",
        R,
        hint="keep only small fields in 'extra'",
    ),
    Case(
        "absurd-adapter-norm",
        "finite but absurd factors (B x 1e15: ||ΔW||_F ~ 1e15)",
        lambda c: c.add(scaled(make_adapter(6), 1e15)),
        NormError,
        "above the registry's cap 1e+04 (limits.max_delta_norm)",
        R,
        hint=f"module {Q0} has ‖scale·B·A‖_F =",
    ),
    Case(
        "steering-adapter-norm",
        "adapter 200x an honest one (||ΔW|| ~ 400, under the absolute cap 1e4) to take over every composition",
        lambda c: c.add(scaled(make_adapter(8), 200.0)),
        UpdateNormBoundError,
        "more than 10 × the median of the 3 adapters of this base and task",
        R,
        hint="site 'e' (task 'xray-chest')",
    ),
    Case(
        "absurd-z-norm",
        "finite but absurd z (every value 1e30)",
        lambda c: c.add(z=np.full(DIM, 1e30, np.float32)),
        NormError,
        "sent z with norm 4e+30, above the registry's cap 1e+06 (limits.max_z_norm)",
        R,
        hint="check the embedding pipeline",
    ),
    Case(
        "rank-zero-bytes",
        "blob whose module has rank 0 (A[0,32], B[32,0])",
        lambda c: c.add(adapter_to_bytes(LoraAdapter({Q0: unchecked_module(torch.zeros(0, 32), torch.zeros(32, 0))}))),
        AdapterFormatError,
        f"module {Q0}: LoRA rank must be at least 1",
        R,
        hint=SEND,
    ),
    Case(
        "rank-zero-object",
        "LoraAdapter whose module has rank 0 (constructor bypassed)",
        _rank_zero_object,
        RankError,
        "has rank 0; the registry accepts 1..16",
        R,
    ),
    Case(
        "rank-above-cap",
        "rank 17 on one module (cap 16)",
        lambda c: c.add(make_adapter(7, rank=17, modules=[V1])),
        RankError,
        "has rank 17; the registry accepts 1..16",
        R,
    ),
    Case(
        "ab-rank-mismatch",
        "blob with A[4,32] but B[32,3]",
        lambda c: c.add(adapter_to_bytes(LoraAdapter({Q0: unchecked_module(torch.randn(4, 32), torch.randn(32, 3))}))),
        AdapterFormatError,
        f"module {Q0}: LoRA rank mismatch: A (4, 32) has 4 rows but B (32, 3) has 3 columns",
        R,
        hint=SEND,
    ),
    Case(
        "no-modules",
        "LoraAdapter with no modules",
        lambda c: c.add(LoraAdapter({})),
        AdapterFormatError,
        "adapter has no modules",
        R,
    ),
    Case(
        "not-an-adapter",
        "a dict of tensors instead of a LoraAdapter",
        lambda c: c.add({"A": torch.zeros(2, 2)}),
        AdapterFormatError,
        "must be a common.adapters.lora.LoraAdapter or its canonical bytes",
        R,
    ),
    # -- the blob itself ----------------------------------------------------------------------------
    Case(
        "corrupt-blob",
        "zip bytes instead of safetensors",
        lambda c: c.add(b"PK\x03\x04" + bytes(range(256)) * 4),
        AdapterFormatError,
        "site 'e': adapter blob has a truncated or oversized safetensors header",
        R,
        hint=f"send exactly {SEND}",
    ),
    Case(
        "tiny-blob",
        "4 bytes",
        lambda c: c.add(b"junk"),
        AdapterFormatError,
        "too short to be safetensors",
        R,
        hint="adapter_to_bytes",
    ),
    Case(
        "truncated-blob",
        "canonical blob minus its last 100 bytes",
        lambda c: c.add(adapter_to_bytes(make_adapter(8))[:-100]),
        AdapterFormatError,
        "site 'e': adapter blob is not valid safetensors",
        R,
        hint="resend if the blob was cut in transit",
    ),
    Case(
        "trailing-garbage",
        "canonical blob plus 16 extra bytes",
        lambda c: c.add(adapter_to_bytes(make_adapter(8)) + b"\0" * 16),
        AdapterFormatError,
        "site 'e': adapter blob is not valid safetensors",
        R,
        hint=f"the registry accepts only {SEND}",
    ),
    Case(
        "stock-safetensors",
        "raw `adapter_model.safetensors` (no rpe metadata)",
        lambda c: c.add(stock_safetensors()),
        AdapterFormatError,
        "adapter blob has rpe_format None, expected 'rpe-lora-v1'",
        R,
        hint="a PEFT directory: load it with common.adapters.lora.load_peft_adapter first",
    ),
    Case(
        "non-canonical-layout",
        "valid safetensors, canonical JSON, tensors stored in another order",
        lambda c: c.add(_reordered(adapter_to_bytes(make_adapter(8)))),
        AdapterFormatError,
        "not in canonical form",
        R,
    ),
    Case(
        "non-canonical-blob",
        "valid safetensors with a re-formatted (spaced) header",
        lambda c: c.add(_respaced(adapter_to_bytes(make_adapter(8)))),
        AdapterFormatError,
        "not in canonical form",
        R,
        hint="encode it with common.adapters.lora.adapter_to_bytes",
    ),
    Case(
        "blob-hash-mismatch",
        "bytes whose sha256 differs from the announced one",
        lambda c: c.add(adapter_to_bytes(make_adapter(9)), expected_sha256="ab" * 32),
        BlobHashMismatchError,
        "altered or truncated in transit",
        R,
        hint="resend it",
    ),
    Case(
        "blob-hash-malformed",
        "announced hash `xyz`",
        lambda c: c.add(adapter_to_bytes(make_adapter(9)), expected_sha256="xyz"),
        BlobHashMismatchError,
        "is not a sha256 (64 hex digits)",
        R,
    ),
    # -- z ------------------------------------------------------------------------------------------
    Case(
        "z-wrong-dim",
        "z of 15 values (registry holds 16)",
        lambda c: c.add(z=make_z(1, 15)),
        EmbeddingDimensionError,
        "sent 15 values, the registry holds 16",
        R,
        hint="compute z with the registry's representation/layer",
    ),
    Case(
        "z-2d",
        "z of shape (1, 16)",
        lambda c: c.add(z=make_z(1).reshape(1, DIM)),
        EmbeddingDimensionError,
        "expected a 1-D vector of 16 values",
        R,
    ),
    Case(
        "z-nan",
        "NaN in z",
        lambda c: c.add(z=np.where(np.arange(DIM) == 3, np.nan, make_z(1))),
        NonFiniteError,
        "non-finite value(s)",
        R,
        hint="recompute the embedding",
    ),
    Case(
        "z-float32-overflow",
        "z of 1e300 (finite in float64, Inf in float32)",
        lambda c: c.add(z=np.full(DIM, 1e300)),
        NonFiniteError,
        "after the cast to float32",
        R,
    ),
    Case(
        "z-strings",
        "z as a list of strings",
        lambda c: c.add(z=["0.1"] * DIM),
        EmbeddingDimensionError,
        "expected a float vector",
        R,
    ),
    # -- metadata -----------------------------------------------------------------------------------
    Case(
        "meta-count-str",
        '`sample_count: "12"`',
        lambda c: c.add(meta=make_meta(sample_count="12")),
        MetadataError,
        "'sample_count' must be an integer; got str",
        R,
    ),
    Case(
        "meta-count-bool",
        "`sample_count: true`",
        lambda c: c.add(meta=make_meta(sample_count=True)),
        MetadataError,
        "'sample_count' must be an integer; got bool",
        R,
    ),
    Case(
        "meta-count-zero",
        "`sample_count: 0`",
        lambda c: c.add(meta=make_meta(sample_count=0)),
        MetadataError,
        "'sample_count' must be >= 1",
        R,
    ),
    Case(
        "meta-site-int",
        "`site: 3`",
        lambda c: c.add(meta=make_meta(site=3)),
        MetadataError,
        "'site' must be a string; got int",
        R,
    ),
    Case(
        "meta-site-spaces",
        '`site: " a "`',
        lambda c: c.add(meta=make_meta(site=" a ")),
        MetadataError,
        "without leading/trailing spaces",
        R,
    ),
    Case(
        "meta-control-chars",
        '`task: "xray\\nchest"`',
        lambda c: c.add(meta=make_meta(task="xray\nchest")),
        MetadataError,
        "contains control characters",
        R,
    ),
    Case(
        "meta-unknown-field",
        "metadata with a `colour` field",
        lambda c: c.add(meta=make_meta(colour="red")),
        MetadataError,
        "unknown field(s) ['colour']",
        R,
        hint="put anything else in 'extra'",
    ),
    Case(
        "meta-missing-field",
        "metadata without `task`",
        lambda c: c.add(meta={k: v for k, v in make_meta().items() if k != "task"}),
        MetadataError,
        "missing required field(s) ['task']",
        R,
    ),
    Case(
        "meta-not-a-dict",
        "metadata is a list",
        lambda c: c.add(meta=["e", TASK]),
        MetadataError,
        "metadata must be an AdapterMeta or a dict; got list",
        R,
    ),
    Case(
        "meta-privacy-list",
        '`privacy: ["dp"]`',
        lambda c: c.add(meta=AdapterMeta(**make_meta(privacy=["dp"]))),
        MetadataError,
        "'privacy' must be a string such as 'none' or a dict",
        R,
    ),
    Case(
        "meta-extra-nan",
        '`extra: {"loss": NaN}`',
        lambda c: c.add(meta=make_meta(extra={"loss": float("nan")})),
        MetadataError,
        "'extra' must hold JSON values only",
        R,
    ),
    Case(
        "unknown-base",
        "base fingerprint `sha256:0b0b…` (not registered)",
        lambda c: c.add(meta=make_meta(base_fingerprint=OTHER_BASE)),
        UnknownBaseError,
        f"base model fingerprint {OTHER_BASE} is not accepted",
        R,
        hint="add it with Registry.add_base",
    ),
    Case(
        "duplicate-other-meta",
        "record 0's adapter + z again, `sample_count` changed",
        _duplicate,
        DuplicateRecordError,
        "already holds this adapter and z with different metadata (fields ['sample_count'])",
        R,
        hint="resubmit the identical metadata, or remove",
    ),
    Case(
        "bulk-one-bad-item",
        "add_many: item 1 has a 15-value z",
        _bulk_one_bad,
        EmbeddingDimensionError,
        "item 1: site 'f' sent 15 values",
        R,
    ),
    Case(
        "bidi-override-site",
        "site name `e\u202egnp.exe` (right-to-left override: reads as `eexe.png`)",
        lambda c: c.add(meta=make_meta(site="e\u202egnp.exe")),
        MetadataError,
        "holds the invisible or control character U+202E",
        R,
    ),
    Case(
        "zero-width-task",
        "task `xray\u200b-chest` (zero-width space: looks like `xray-chest`)",
        lambda c: c.add(meta=make_meta(task="xray\u200b-chest")),
        MetadataError,
        "holds the invisible or control character U+200B",
        R,
    ),
    # -- queries and composition --------------------------------------------------------------------
    Case(
        "k-above-registry",
        "query k=5 on a 4-record registry",
        lambda c: c.reg.query(make_z(2), 5),
        NotEnoughRecordsError,
        "asked for k=5 nearest adapters but only 4 record(s) match",
        hint="lower k or widen the filters",
    ),
    Case("k-zero", "query k=0", lambda c: c.reg.query(make_z(2), 0), QueryError, "k must be a positive integer; got 0"),
    Case(
        "k-negative",
        "query k=-2",
        lambda c: c.reg.query(make_z(2), -2),
        QueryError,
        "k must be a positive integer; got -2",
    ),
    Case(
        "k-float",
        "query k=2.5",
        lambda c: c.reg.query(make_z(2), 2.5),
        QueryError,
        "k must be a positive integer; got 2.5",
    ),
    Case(
        "k-bool",
        "query k=True",
        lambda c: c.reg.query(make_z(2), True),
        QueryError,
        "k must be a positive integer; got True",
    ),
    Case(
        "query-method",
        "query method='fast'",
        lambda c: c.reg.query(make_z(2), 1, method="fast"),
        QueryError,
        "method must be auto, brute, index or approx",
    ),
    Case(
        "query-z-dim",
        "query z of 17 values",
        lambda c: c.reg.query(make_z(2, 17), 1),
        EmbeddingDimensionError,
        "the query sent 17 values, the registry holds 16",
    ),
    Case(
        "query-z-inf",
        "query z with Inf",
        lambda c: c.reg.query(np.full(DIM, np.inf), 1),
        NonFiniteError,
        "the query sent z with 16 non-finite value(s)",
    ),
    Case(
        "task-without-adapters",
        "compose for task `xray-knee` (no adapters; the registry has no task list)",
        lambda c: c.compose(task="xray-knee", k=1),
        NotEnoughRecordsError,
        "no record has task='xray-knee'",
        hint="(tasks present: ct-head, xray-chest)",
    ),
    Case(
        "compose-k-above",
        "compose k=4 for a task with 3 adapters",
        lambda c: c.compose(k=4),
        NotEnoughRecordsError,
        "asked for k=4 nearest adapters but only 3 record(s) match (task='xray-chest')",
    ),
    Case(
        "compose-unknown-base",
        "compose with base `sha256:0b0b…`",
        lambda c: c.compose(base=OTHER_BASE),
        CompositionError,
        f"base {OTHER_BASE} is not known to registry",
        hint=f"(known: {BASE}); pass one of them or omit base",
    ),
    Case(
        "compose-target-z-dim",
        "target z of 8 values",
        lambda c: c.compose(z=make_z(3, 8)),
        EmbeddingDimensionError,
        "the target 'e' sent 8 values, the registry holds 16",
    ),
    Case(
        "unknown-strategy",
        "strategy `softmax`",
        lambda c: c.compose(strategy="softmax"),
        ValueError,
        "unknown weighting strategy 'softmax'; valid strategies: " + ", ".join(sorted(STRATEGIES)),
        (QUERY,),
    ),
    Case(
        "lin-max-l1-below-one",
        "lin with max_l1=0.5 (Σw = 1 forces ‖w‖₁ >= 1)",
        lambda c: c.compose(strategy="lin", strategy_params={"max_l1": 0.5}),
        ValueError,
        "max_l1 must be >= 1",
        (QUERY,),
    ),
    Case(
        "lam1-nan",
        "sim with lam1=NaN",
        lambda c: c.compose(lam1=float("nan")),
        ValueError,
        "lam1 must be > 0 (inf allowed); got nan",
        (QUERY,),
    ),
    Case(
        "lam1-negative",
        "sim with lam1=-1",
        lambda c: c.compose(lam1=-1.0),
        ValueError,
        "lam1 must be > 0 (inf allowed); got -1",
        (QUERY,),
    ),
    Case(
        "lam2-inf",
        "lin-l1 with lam2=Inf",
        lambda c: c.compose(strategy="lin-l1", lam2=float("inf")),
        ValueError,
        "lam2 must be >= 0 and finite; got inf",
        (QUERY,),
    ),
    Case(
        "strategy-param-typo",
        "sim with `lam3=1`",
        lambda c: c.compose(strategy_params={"lam3": 1.0}),
        ValueError,
        "strategy 'sim' does not take lam3; it takes lam1",
        (QUERY,),
    ),
    Case(
        "max-rank-zero",
        "compose max_rank=0",
        lambda c: c.compose(max_rank=0),
        LoraFormatError,
        "max_rank must be a positive integer or None, got 0",
        (QUERY,),
    ),
    Case(
        "max-rank-negative",
        "compose max_rank=-3",
        lambda c: c.compose(max_rank=-3),
        LoraFormatError,
        "max_rank must be a positive integer or None, got -3",
        (QUERY,),
    ),
    Case(
        "max-rank-float",
        "compose max_rank=2.5",
        lambda c: c.compose(max_rank=2.5),
        LoraFormatError,
        "max_rank must be a positive integer or None, got 2.5",
        (QUERY,),
    ),
    Case(
        "max-rank-nan",
        "compose max_rank=NaN",
        lambda c: c.compose(max_rank=float("nan")),
        LoraFormatError,
        "max_rank must be a positive integer or None, got nan",
        (QUERY,),
    ),
    Case(
        "max-rank-inf",
        "compose max_rank=Inf",
        lambda c: c.compose(max_rank=float("inf")),
        LoraFormatError,
        "max_rank must be a positive integer or None, got inf",
        (QUERY,),
    ),
    Case(
        "remove-unknown-record",
        "remove id `e:xray-chest:0000000000000000`",
        lambda c: c.reg.remove("e:xray-chest:0000000000000000"),
        RecordNotFoundError,
        "no record 'e:xray-chest:0000000000000000'",
        hint="see `rpe registry ls`",
    ),
    # -- the coordinator's enrolment round (server/app.py run_enroll, real code, fake grid) -----------
    Case(
        "wire-extra-record",
        "enrol reply with an extra `raw_reports` record",
        _extra_record,
        WireError,
        "may only carry records ['adapter', 'embedding', 'meta']; refusing ['raw_reports']",
        R,
    ),
    Case(
        "wire-extra-meta-key",
        "enrol meta with an extra `patient_name` key",
        lambda c: c.enroll(lambda n: c.reply(n, patient_name="Jane Doe")),
        WireError,
        "unknown key(s) ['patient_name']",
        R,
    ),
    Case(
        "wire-missing-meta-key",
        "enrol meta without `sample_count`",
        _missing_meta_key,
        WireError,
        "missing key(s) ['sample_count']",
        R,
    ),
    Case(
        "wire-meta-type",
        'enrol meta `sample_count: "12"`',
        lambda c: c.enroll(lambda n: c.reply(n, sample_count="12")),
        WireError,
        "meta['sample_count']: expected int, got str",
        R,
    ),
    Case(
        "wire-schema",
        "enrol meta `schema: rpe-wire/0`",
        lambda c: c.enroll(lambda n: c.reply(n, schema="rpe-wire/0")),
        WireError,
        "schema 'rpe-wire/0' is not",
        R,
    ),
    Case(
        "wire-lora-config-field",
        "lora_config with an extra `use_dora` field",
        _lora_config_extra_field,
        WireError,
        "expected an object with exactly 'peft_type' and 'modules'",
        R,
    ),
    Case(
        "wire-extra-tensor",
        "adapter vector with an extra `lm_head.weight` packed in",
        _extra_tensor,
        WireError,
        "does not match the LoRA config",
        R,
    ),
    Case(
        "wire-per-factor-arrays",
        "adapter record with one array per factor (wire schema 1)",
        _per_factor_arrays,
        WireError,
        "expected exactly one array 'lora_factors'",
        R,
    ),
    Case(
        "wire-tensor-shape",
        "adapter vector with B[32,3] packed where the LoRA config says r=4",
        _wrong_array_shape,
        WireError,
        "does not match the LoRA config",
        R,
    ),
    Case("wire-float64", "adapter vector in float64", _float64_arrays, WireError, "dtype float64 is not float32", R),
    Case("wire-nan", "NaN in an adapter array", _nan_array, WireError, "contains NaN or inf", R),
    Case(
        "wire-z-vs-spec",
        "z of 18 values, embedding_spec says dim 16",
        _z_vs_spec,
        WireError,
        "18 values, but the embedding spec says dim=16",
        R,
    ),
    Case(
        "enroll-z-dim",
        "consistent reply, but z (and spec) of 20 values; registry holds 16",
        lambda c: c.enroll(lambda n: c.reply(n, z=make_z(5, 20))),
        EmbeddingDimensionError,
        "site 'a' sent 20 values, the registry holds 16",
        R,
    ),
    Case(
        "enroll-hash-mismatch",
        "announced `blob_sha256` is not the adapter's",
        lambda c: c.enroll(lambda n: c.reply(n, blob_sha256="cd" * 32)),
        BlobHashMismatchError,
        "but the submission announced " + "cd" * 32,
        R,
    ),
    Case(
        "enroll-unknown-base",
        "site trained on an unregistered base",
        lambda c: c.enroll(lambda n: c.reply(n, base_fingerprint=OTHER_BASE)),
        UnknownBaseError,
        "is not accepted by this registry",
        R,
    ),
    Case(
        "enroll-site-claim",
        "reply from `a` claiming to be site `b`",
        lambda c: c.enroll(lambda n: c.reply(n, site="b")),
        WireError,
        "reply claims site 'b' but came from 'a'",
        R,
    ),
    Case(
        "enroll-other-task",
        "reply naming another task than the request (`report-text-v2`), 1000x norm: stored unbounded before",
        lambda c: c.enroll(lambda n: c.reply(n, adapter=scaled(make_adapter(71), 1000.0), task="report-text-v2")),
        WireError,
        "reply is for task 'report-text-v2' but the request asked for 'xray-chest'",
        R,
    ),
    Case(
        "enroll-replayed-reply",
        "an old genuine signed reply replayed (old nonce)",
        _replayed_reply,
        WireError,
        "reply answers another request (nonce mismatch)",
        R,
    ),
    Case(
        "enroll-bad-signature",
        "signed reply, `sample_count` altered after signing",
        lambda c: c.enroll(lambda n: c.reply(n, sign_as="a", after_signing={"sample_count": 99})),
        SignatureError,
        "signature does not verify",
        R,
    ),
    Case(
        "enroll-wrong-key",
        "site `a` reply signed with site `b`'s key",
        lambda c: c.enroll(lambda n: c.reply(n, sign_as="b")),
        SignatureError,
        "signature does not verify",
        R,
    ),
    Case(
        "enroll-signature-garbage",
        "signature `not-base64!`",
        lambda c: c.enroll(lambda n: c.reply(n, signature="not-base64!", signer="x")),
        SignatureError,
        "signature is not valid base64",
        R,
    ),
    Case(
        "enroll-unknown-site",
        "signed reply from site `b`, which is not on the allow-list",
        lambda c: c.enroll(lambda n: c.reply(n, site="b", sign_as="b"), site="b"),
        UnknownSiteError,
        "site 'b' is not on the allow-list",
        R,
        hint="(allowed: a)",
    ),
    Case(
        "enroll-unsigned",
        "unsigned reply while `require-signatures` is on",
        lambda c: c.enroll(lambda n: c.reply(n), require_signatures=True),
        SignatureError,
        "unsigned submission, and this coordinator requires signatures",
        R,
    ),
    Case(
        "enroll-site-not-online",
        "enrol site `ghost` (never answered whoami)",
        lambda c: c.enroll(lambda n: None, site="ghost"),
        Reported,
        "did not answer query.whoami (offline or unknown)",
        R,
        audit_match="offline",
    ),
    # -- the coordinator's compose round --------------------------------------------------------------
    Case(
        "compose-unknown-target",
        "compose for target `ghost` (not online / unknown)",
        lambda c: c.run_compose("ghost"),
        Reported,
        "target site is offline",
    ),
    Case(
        "embed-extra-meta-key",
        "query.embed reply with an extra `age` key",
        lambda c: c.embed(lambda n: c.embed_reply(n, age=63)),
        WireError,
        "unknown key(s) ['age']",
        ("query.failed",),
    ),
    # -- signatures and freshness (common/trust/signing.py) ------------------------------------------------
    Case(
        "replayed-nonce",
        "a genuine signed submission authenticated twice",
        _replayed_nonce,
        ReplayError,
        "was already used by site 'a': replayed submission",
    ),
    Case(
        "stale-nonce",
        "a genuine signed submission with a 3-day-old nonce",
        _stale_nonce,
        StaleSubmissionError,
        "s old; the limit is 86400 s",
    ),
    # -- PEFT directories (common/adapters/lora.py load_peft_adapter) ------------------------------------------
    Case(
        "peft-dora",
        "PEFT dir with `use_dora: true`",
        lambda c: load_peft_adapter(c.peft_dir({"use_dora": True})),
        LoraFormatError,
        "use_dora is true",
        hint="retrain with use_dora=False",
    ),
    Case(
        "peft-dora-tensor",
        "PEFT dir holding a `lora_magnitude_vector` tensor",
        lambda c: load_peft_adapter(
            c.peft_dir(extra_tensors={f"base_model.model.{Q0}.lora_magnitude_vector": torch.ones(32)})
        ),
        LoraFormatError,
        "is a DoRA magnitude vector",
    ),
    Case(
        "peft-modules-to-save",
        'PEFT dir with `modules_to_save: ["lm_head"]`',
        lambda c: load_peft_adapter(c.peft_dir({"modules_to_save": ["lm_head"]})),
        LoraFormatError,
        "modules_to_save=['lm_head'] stores full copies of modules",
        hint="retrain without modules_to_save",
    ),
    Case(
        "peft-rank-config",
        "PEFT dir whose config says r=8 for rank-4 tensors",
        lambda c: load_peft_adapter(c.peft_dir({"r": 8, "rank_pattern": {}})),
        LoraFormatError,
        "gives it rank 8; fix the config",
    ),
    # -- a site's dataset (common/families/report/data.py, common/embedding.py, client/app.py) -----------------------
    Case(
        "jsonl-not-json",
        "dataset line `Findings: normal` (not JSON)",
        lambda c: read_jsonl(c.jsonl('{"prompt": "ok", "group": "g"}\nFindings: normal\n')),
        DatasetFormatError,
        "line 2: expected one JSON object per line",
    ),
    Case(
        "jsonl-no-prompt",
        "dataset line without `prompt`",
        lambda c: read_jsonl(c.jsonl('{"target": "Impression: normal", "group": "g"}\n')),
        DatasetFormatError,
        "line 1: expected 'prompt', a non-empty string",
    ),
    Case(
        "jsonl-misspelt-key",
        "dataset line with `targt` instead of `target`",
        lambda c: read_jsonl(c.jsonl('{"prompt": "p", "targt": "t", "group": "g"}\n')),
        DatasetFormatError,
        "unknown keys ['targt']",
    ),
    Case(
        "empty-dataset-embed",
        "empty dataset file -> site embedding",
        _empty_dataset_embedding,
        EmptyDatasetError,
        "cannot compute a site embedding: the dataset has no examples",
        hint="check the path",
    ),
    Case(
        "empty-dataset-enroll",
        "empty dataset file -> enrolment request at the site",
        _empty_dataset_enroll,
        SiteError,
        "has no labeled training examples",
    ),
    # -- identity: a node must prove the site it claims (server/messaging.py discover) -----------
    Case(
        "impostor-node",
        "node 7's whoami claims site `a` with an identity statement signed by `b`'s key",
        _impostor_node,
        IdentityRefused,
        "signed by key",
        (IDENTITY,),
        audit_match="claims site 'a'",
    ),
    Case(
        "unsigned-identity",
        "node 7's whoami claims site `a` with no identity statement (signatures required)",
        _unsigned_claim,
        IdentityRefused,
        "without a signed identity statement",
        (IDENTITY,),
        hint="give the site its key",
    ),
    Case(
        "unsigned-identity-signatures-off",
        "node 7's unsigned whoami claims site `a` (which has a key) with `require-signatures=false`",
        _unsigned_claim_signatures_off,
        IdentityRefused,
        "has a signing key on the allow-list",
        (IDENTITY,),
        hint="whatever require-signatures says",
    ),
    Case(
        "replayed-identity",
        "node 7 replays site `a`'s genuine identity statement from an earlier challenge",
        _replayed_identity,
        IdentityRefused,
        "expected",
        (IDENTITY,),
        audit_match="claims site 'a'",
    ),
    # -- deliveries: a site installs only what its coordinator signed (client/handlers.py apply) ------
    Case(
        "unsigned-delivery",
        "`train.apply` without a coordinator `delivery` statement",
        _unsigned_delivery,
        DeliveryRefused,
        "carries no coordinator signature",
    ),
    Case(
        "foreign-delivery",
        "`train.apply` whose delivery statement is signed by another key",
        _foreign_delivery,
        DeliveryRefused,
        "does not hold: the delivery statement is signed by key",
    ),
    Case(
        "delivery-overwrites-own",
        "`train.apply` named `own-report-text` (the site's own adapter)",
        _overwrite_own,
        WireError,
        "not starting with 'own-'",
    ),
    Case(
        "unsigned-evaluate",
        "`train.evaluate` without a coordinator `delivery` statement",
        _unsigned_evaluate,
        DeliveryRefused,
        "carries no coordinator signature",
    ),
    Case(
        "swapped-evaluate-arms",
        "`train.evaluate` whose arms differ from the ones its coordinator signed",
        _swapped_evaluate,
        DeliveryRefused,
        "does not hold",
    ),
    # -- the site's release policy (client/policy.py via client/handlers.py) ---------------------------
    Case(
        "subset-z",
        "`query.embed` with `max_examples=3` (a z over 3 of 12 reports)",
        lambda c: _embed_request(c, max_examples=3),
        ReleaseRefused,
        "releases z only over its whole eligible",
    ),
    Case(
        "layer-0-z",
        "`query.embed` with `embed_layer=0` (the token-embedding layer)",
        lambda c: _embed_request(c, embed_layer=0),
        ReleaseRefused,
        "is not in this site's z-layers",
    ),
    Case(
        "metrics-few-reports",
        "`train.apply` asking metrics over `max_eval=1` held-out report",
        _metrics_few_reports,
        ReleaseRefused,
        "releases metrics only over at least 10",
    ),
]


def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, raises=Gap, reason=case.gap)] if case.gap else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# --------------------------------------------------------------------------------------------
# fixtures and checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "registry"
    reg = Registry.init(
        root, base_fingerprint=BASE, module_shapes=SHAPES, embedding_dim=DIM, limits=LIMITS, base_name="tiny-base"
    )
    first = (make_adapter(100), make_z(100), make_meta(site="a"))
    reg.add(*first)
    reg.add(make_adapter(101), make_z(101), make_meta(site="b"))
    reg.add(make_adapter(102), make_z(102), make_meta(site="c", sample_count=30))
    reg.add(make_adapter(103), make_z(103), make_meta(site="d", task="ct-head", modality="ct"))
    reg.close()
    NonceLedger(root / "nonces.jsonl")
    keys = {}
    for site in ("a", "b"):
        keys[site], _ = signing.generate_keypair(tmp / "keys", site)
    allowlist = tmp / "allowlist.json"
    AllowList(allowlist).add("a", (tmp / "keys" / "a.pub").read_bytes())
    reg = Registry(root)  # snapshots start after Chroma has been closed and reopened
    yield World(tmp, root, reg, allowlist, keys, first, 4)
    reg.close()


@pytest.fixture
def ctx(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest):
    case: Case = request.node.callspec.params["case"]
    if not case.isolated:
        yield Ctx(world, world.reg, world.root, tmp_path, monkeypatch)
        return
    copy = tmp_path / "registry"
    shutil.copytree(world.root, copy, ignore=shutil.ignore_patterns(".lock"))
    reg = Registry(copy, chroma="off")
    try:
        yield Ctx(world, reg, copy, tmp_path, monkeypatch)
    finally:
        reg.close()


def tree_hash(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def durable_state(root: Path) -> dict[str, dict[str, str]]:
    return {name: tree_hash(root / name) for name in DURABLE}


def logical_state(reg: Registry) -> tuple[list[str], bytes]:
    ids = reg.ids()
    return ids, reg.embeddings(ids).tobytes()


def audit_entries(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]


def raised_at(exc: BaseException) -> str:
    """``path:function`` of the innermost project frame (not tests/) the exception passed through."""
    where = "?"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        path = Path(frame.f_code.co_filename).resolve()
        try:
            rel = path.relative_to(ROOT)
        except ValueError:
            continue
        if rel.parts[0] in ("tests", ".venv"):
            continue
        where = f"{rel}:{frame.f_code.co_qualname}"
    return where


def describe(exc: BaseException) -> tuple[str, str, str]:
    """(error type name, message, where it is caught) of what a case raised."""
    if isinstance(exc, Reported):
        if exc.cause is not None:
            return type(exc.cause).__name__, exc.reason, f"{raised_at(exc.cause)} → {exc.reporter}"
        head = exc.reason.split(":", 1)[0]
        return (head if head.endswith("Error") else f"reported: {exc.status}"), exc.reason, exc.reporter
    return type(exc).__name__, str(exc), raised_at(exc)


def _untmp(text: str, ctx: Ctx) -> str:
    """The message with this run's temporary directories replaced by ``<tmp>`` (for the doc)."""
    for path in sorted({str(ctx.tmp), str(ctx.world.tmp), str(ctx.root.parent)}, key=len, reverse=True):
        text = text.replace(path, "<tmp>")
    return text


def _dump(row: dict[str, Any]) -> None:
    path = os.environ.get(DUMP_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class Gap(AssertionError):
    """The refusal falls short of the spec (input accepted, wrong error type, message without the problem or
    the remedy). Gap rows are ``xfail(strict=True, raises=Gap)``: any *other* failure of such a row (e.g. a
    file changed by a rejection) is still reported as a failure."""


@pytest.mark.parametrize("case", _params())
def test_hostile_input_is_refused_and_changes_nothing(case: Case, ctx: Ctx):
    before, logical, audit_before = durable_state(ctx.root), logical_state(ctx.reg), audit_entries(ctx.root)
    row: dict[str, Any] = {
        "id": case.id,
        "input": case.input,
        "expected": case.error.__name__,
        "gap": case.gap,
        "fix": case.fix,
    }
    problems: list[str] = []
    try:
        case.call(ctx)
    except Exception as exc:  # noqa: BLE001 - every refusal is inspected below
        name, message, where = describe(exc)
        row.update(error=name, message=_untmp(message, ctx), where=where)
        _dump(row)
        if case.error is Reported or not isinstance(exc, Reported):
            ok = isinstance(exc, case.error)
        elif exc.cause is not None:
            ok = isinstance(exc.cause, case.error)
        else:
            ok = message.startswith(f"{case.error.__name__}: ")
        if not ok:
            problems.append(f"raised {name}, not {case.error.__name__}")
        if case.match not in message:
            problems.append(f"the message does not name the problem ({case.match!r})")
        if case.hint is not None and case.hint not in message:
            problems.append(f"the message lacks {case.hint!r}")
    else:
        row.update(error="(accepted)", message="(no error: the input was accepted)", where="(nowhere)")
        _dump(row)
        raise Gap(f"{case.id}: {case.input} was accepted")

    assert durable_state(ctx.root) == before, "records.jsonl, blobs/, chroma/, registry.json or nonces changed"
    assert logical_state(ctx.reg) == logical, "the registry's live ids or z changed"
    assert len(ctx.reg) == ctx.world.n_records
    after = audit_entries(ctx.root)
    assert after[: len(audit_before)] == audit_before, "earlier audit entries changed"
    new = after[len(audit_before) :]
    assert [e["event"] for e in new] == list(case.audit), f"{case.id}: unexpected audit entries {new}"
    for entry in new:
        if entry["event"] == REJECTED:
            assert (case.audit_match or case.match) in entry["reason"], entry
            if "error" in entry:  # written by the registry itself: str(exc) (run_enroll prefixes the type)
                assert entry["error"] == name and message.endswith(entry["reason"]), entry
            else:  # written by server/app.py: the reported reason, cut at 1000 characters
                assert message.startswith(entry["reason"]) or entry["reason"] == case.audit_match, entry
        if entry["event"] == IDENTITY:
            assert (case.audit_match or case.match) in entry["reason"] and entry["node_id"] == "7", entry
        if entry["event"] == QUERY:
            assert entry["site"] == "e" and len(entry["z_sha256"]) == 64, entry
    assert verify_audit(ctx.root / "audit.jsonl") == []
    if problems:
        raise Gap(f"{case.id}: {'; '.join(problems)}: {message!r}")


def test_enrolment_harness_accepts_a_valid_signed_reply(world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Control: the fake-grid enrolment path stores a well-formed signed reply (so the rows above are
    refused because of their defect, not because the harness is broken)."""
    copy = tmp_path / "registry"
    shutil.copytree(world.root, copy, ignore=shutil.ignore_patterns(".lock"))
    with Registry(copy, chroma="off") as reg:
        c = Ctx(world, reg, copy, tmp_path, monkeypatch)
        # keep-previous: site a's adapter in the world stays live beside the new one (no supersede entries)
        res = c.enroll(lambda n: c.reply(n, sign_as="a"), require_signatures=True, keep_previous=True)
        assert res["status"] == "accepted" and res["signed"] and len(reg) == world.n_records + 1
        z = c.embed(lambda n: c.embed_reply(n))
        assert z.shape == (DIM,)
        entries = audit_entries(copy)
        assert [e["event"] for e in entries[-2:]] == ["submission.accepted", QUERY]
        accepted = entries[-2]  # the registry's one entry, with what the app saw on the wire
        assert accepted["run_id"] == RUN_ID and accepted["record_id"] == res["record_id"]
        assert set(accepted["record_digests"]) == {"adapter", "embedding", "meta"} and accepted["nonce"]
        assert accepted["signer"] and accepted["signature"]


def test_registry_is_consistent_after_every_case(world: World):
    assert world.reg.verify(full=True) == []
    assert len(world.reg) == world.n_records
    reopened = Registry(world.root, read_only=True)
    try:
        assert reopened.ids() == world.reg.ids()
    finally:
        reopened.close()


def test_doc_table_has_a_row_per_case():
    text = DOC.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) >= 20
    ids = {line.rsplit("|", 2)[-2].strip().strip("`") for line in rows}
    assert ids == {c.id for c in CASES}, sorted(ids ^ {c.id for c in CASES})


# --------------------------------------------------------------------------------------------
# doc generation: .venv/bin/python tests/unit/test_hostile.py
# --------------------------------------------------------------------------------------------


def _cell(text: str, limit: int = 230) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def render(rows: list[dict[str, Any]], summary: str) -> str:
    by_id = {r["id"]: r for r in rows}
    out = [
        "# Hostile and malformed inputs",
        "",
        "Every row is one case of the parametrized table in `tests/unit/test_hostile.py` (test id in the last",
        "column). Each test builds the input, feeds it to the component that must refuse it and checks the",
        "error type, that the message names the problem, that `records.jsonl`, `blobs/`, `chroma/`,",
        "`registry.json` and `nonces.jsonl` are byte-for-byte unchanged (and the live ids and z too), and that",
        "`audit.jsonl` gained exactly the documented entries (**audit** column: `rejected` = one",
        "`submission.rejected` entry naming the reason, `query` = the `query.embedding` entry a composition",
        "writes before it weighs and composes, `identity` = one `identity.refused` entry naming the node and",
        "the claim, `query-failed` = one `query.failed` entry for an unusable z reply, `-` = nothing) with",
        "its hash chain intact.",
        "",
        "The messages below are copied from a real run (`.venv/bin/python tests/unit/test_hostile.py` regenerates",
        f"this file). {summary}",
        "",
        "Rows marked **GAP** are inputs that are accepted today or refused with an unhelpful error; their tests",
        "are `xfail(strict=True)` and start passing (then fail as XPASS, so the mark must be removed) once the",
        "owner's module is fixed. The fix for each is listed under the table.",
        "",
        "| # | input | where it is caught | error type | audit | message (abridged) | test id |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, case in enumerate(CASES, start=1):
        r = by_id.get(case.id, {})
        names = {REJECTED: "rejected", IDENTITY: "identity", "query.failed": "query-failed"}
        audit = " + ".join(names.get(e, "query") for e in case.audit) or "-"
        err = r.get("error", "?")
        if case.gap and err == case.error.__name__:
            err = f"**GAP** {err} (message)"
        elif case.gap:
            err = f"**GAP** (got {err}; want {case.error.__name__})"
        out.append(
            f"| {i} | {_cell(case.input, 90)} | `{_cell(r.get('where', '?'), 90)}` | {err} | {audit} | "
            f"{_cell(r.get('message', '?'))} | `{case.id}` |"
        )
    gaps = [c for c in CASES if c.gap]
    out += ["", "## Gaps (xfail rows) and the fix each needs", ""]
    for c in gaps:
        out.append(f"- `{c.id}`: {c.gap}. **Fix:** {c.fix}")
    if not gaps:
        out.append("None: every row is refused as specified.")
    out += [
        "",
        "## Notes",
        "",
        "- There is no notion of allowed tasks: the registry stores any task string and a composition for a task",
        "  with no adapters fails with `NotEnoughRecordsError` naming the tasks present (row",
        "  `task-without-adapters`).",
        "- `exclude_site` / the target of a composition may name a site with no records (a new site composing",
        "  for itself is the main use case), so an unknown target is only refused by the coordinator when it is",
        "  not online (rows `enroll-site-not-online`, `compose-unknown-target`).",
        "- `read_jsonl` returns `[]` for an empty file; the site refuses later, when it embeds or trains",
        "  (rows `empty-dataset-embed`, `empty-dataset-enroll`). Its `query.whoami` reply still says",
        "  `data_ok: true` with `n_examples: 0` (client/app.py `_whoami`; `data_ok` could also require examples).",
        "- The audit entry for a site that is not online (`enroll-site-not-online`) says only `offline`; the run",
        "  report says `offline or unknown`.",
        "- The registry checks `1 <= r <= max_rank` but not `r <= min(out, in)`, which the wire's",
        "  `parse_lora_config` does enforce (harmless, only wasteful: not a table row).",
        "- Composition failures after the retrieval (bad strategy, its parameters, `max_rank`) leave the",
        "  `query.embedding` entry and no failure entry: the strategy and `max_rank` are validated only after",
        "  the query, the audit write and (for `max_rank`) loading every retrieved adapter.",
        "- Refusals by `server/app.py` (`run_enroll`) are reported in the run report and logged as one",
        "  `submission.rejected` entry (by the registry itself for registry errors, by the app otherwise);",
        "  refusals in `embed_sites` / `run_compose` and client-side refusals write no audit entry.",
        "",
    ]
    return "\n".join(out)


def main() -> int:
    dump = Path(os.environ.get("TMPDIR", "/tmp")) / f"hostile-{os.getpid()}.jsonl"
    dump.unlink(missing_ok=True)
    os.environ[DUMP_ENV] = str(dump)
    t0 = time.perf_counter()
    rc = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-k", "hostile_input", "-W", "ignore"])
    elapsed = time.perf_counter() - t0
    rows = [json.loads(line) for line in dump.read_text(encoding="utf-8").splitlines()]
    dump.unlink()
    n_gap = sum(1 for c in CASES if c.gap)
    summary = (
        f"{len(CASES)} cases: {len(CASES) - n_gap} refused as specified, {n_gap} known gaps (xfail); "
        f"run time {elapsed:.0f} s."
    )
    DOC.write_text(render(rows, summary), encoding="utf-8")
    print(f"wrote {DOC} ({summary})")
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
