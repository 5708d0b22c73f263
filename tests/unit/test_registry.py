"""Registry: exact retrieval, durability on reopen, validation that changes nothing, Chroma as a
rebuildable cache. Synthetic adapters against a synthetic base (a module-shapes dict): no model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.registry import (
    BASE,
    BASE2,
    DIM,
    SHAPES,
    SHAPES2,
    audit_lines,
    brute_force,
    make_adapter,
    make_meta,
    new_registry,
    state,
)

from common.adapters import LoraAdapter, LoraModule, adapter_to_bytes
from server.registry import (
    AdapterFormatError,
    BlobCorruptError,
    BlobHashMismatchError,
    DtypeError,
    DuplicateRecordError,
    EmbeddingDimensionError,
    MetadataError,
    NonFiniteError,
    NormError,
    NotEnoughRecordsError,
    PayloadTooLargeError,
    RankError,
    RecordNotFoundError,
    Registry,
    RegistryError,
    ShapeMismatchError,
    UnknownBaseError,
    UnknownModuleError,
    ValidationError,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory):
    """1,000 records (5 sites × 3 tasks × 3 modalities) with random z, loaded via add_many."""
    root = tmp_path_factory.mktemp("filled") / "reg"
    rng = np.random.default_rng(7)
    Z = rng.standard_normal((1000, DIM)).astype(np.float32)
    blobs = [adapter_to_bytes(make_adapter(i % 50)) for i in range(50)]
    reg = new_registry(root)
    t = time.perf_counter()
    recs = reg.add_many([(blobs[i % 50], Z[i], make_meta(i)) for i in range(1000)])
    elapsed = time.perf_counter() - t
    assert len(reg) == 1000 and len({r.id for r in recs}) == 1000
    print(f"add_many 1000 × {DIM}: {elapsed:.2f} s")
    yield reg, root, Z, [r.id for r in recs]
    reg.close()


def _check_query(reg: Registry, Z: np.ndarray, ids: list[str], q: np.ndarray, k: int, method: str, **filters) -> None:
    mask = np.ones(len(ids), dtype=bool)
    for i in range(len(ids)):
        m = make_meta(i)
        if filters.get("task") and m.task != filters["task"]:
            mask[i] = False
        if filters.get("modality") and m.modality != filters["modality"]:
            mask[i] = False
        if filters.get("exclude_site") and m.site == filters["exclude_site"]:
            mask[i] = False
    rows = np.flatnonzero(mask)
    order, dist = brute_force(Z[rows], q, k)
    hits = reg.query(q, k, method=method, **filters)
    assert [h.record.id for h in hits] == [ids[rows[o]] for o in order]
    np.testing.assert_allclose([h.distance for h in hits], dist, rtol=1e-12)


@pytest.mark.parametrize("method", ["auto", "brute", "index"])
def test_exact_topk_equals_bruteforce(filled, method):
    reg, _, Z, ids = filled
    rng = np.random.default_rng(1)
    for trial in range(6):
        q = rng.standard_normal(DIM).astype(np.float32)
        if trial % 2:
            q = Z[trial * 37] + 0.01 * q  # a query sitting next to a stored record
        _check_query(reg, Z, ids, q, 8, method)
        _check_query(reg, Z, ids, q, 5, method, task="ct-head")
        _check_query(reg, Z, ids, q, 3, method, exclude_site="b")
        _check_query(reg, Z, ids, q, 4, method, task="xray-chest", modality="xray", exclude_site="a")
        _check_query(reg, Z, ids, q, 1, method, modality="mr")
    # the whole eligible set (k = N) is ordered exactly too
    _check_query(reg, Z, ids, Z[3], 1000, method)


def test_index_path_certifies_when_chroma_misses(filled):
    """Even candidates that exclude the true neighbours are repaired by the lower-bound check."""
    reg, _, Z, ids = filled
    assert reg.index_ready
    real = reg._chroma_candidates
    try:
        reg._chroma_candidates = lambda q, want, where: np.arange(900, 900 + want)  # deliberately wrong
        q = Z[5] + 0.001
        _check_query(reg, Z, ids, q, 6, "index")
    finally:
        reg._chroma_candidates = real


@pytest.mark.parametrize("kind", ["isotropic", "clustered"])
def test_high_dim_index_path_exact(tmp_path, kind):
    """576-d data. Isotropic: a 64-d bound prunes nothing, the index path hands over to brute
    force. Clustered (like real site embeddings): the bound prunes, the certified path answers."""
    rng = np.random.default_rng(3)
    if kind == "isotropic":
        Z = rng.standard_normal((300, 576)).astype(np.float32)
    else:
        centres = 10 * rng.standard_normal((12, 576))
        Z = (centres[rng.integers(0, 12, 300)] + rng.standard_normal((300, 576))).astype(np.float32)
    blob = adapter_to_bytes(make_adapter(1))
    with new_registry(tmp_path / "r", dim=576) as reg:
        ids = [r.id for r in reg.add_many([(blob, Z[i], make_meta(i)) for i in range(300)])]
        for method in ("index", "brute", "auto"):
            for trial in range(4):
                q = Z[trial * 7] + rng.standard_normal(576).astype(np.float32) * (0.5 if trial % 2 else 3.0)
                order, dist = brute_force(Z, q, 10)
                hits = reg.query(q, 10, method=method)
                assert [h.record.id for h in hits] == [ids[o] for o in order]
                np.testing.assert_allclose([h.distance for h in hits], dist, rtol=1e-12)
        assert reg._search.proj is not None and bool(reg._search.proj.get("weak")) == (kind == "isotropic")
        if kind == "clustered":
            assert reg._search.index_misses == 0, "the certified path fell back to a full scan"


def test_query_errors(filled):
    reg, _, Z, _ = filled
    with pytest.raises(NotEnoughRecordsError, match=r"k=400 .* only 333 record\(s\) match \(task='ct-head'\)"):
        reg.query(Z[0], 400, task="ct-head")
    with pytest.raises(
        NotEnoughRecordsError,
        match="only 0 .*no record has task='no-such-task' \\(tasks present: ct-head, mr-head, xray-chest\\)",
    ):
        reg.query(Z[0], 1, task="no-such-task")
    with pytest.raises(NormError, match="the query sent z with norm"):
        reg.query(np.full(DIM, 1e7), 3)
    with pytest.raises(EmbeddingDimensionError, match=f"sent 47 values, the registry holds {DIM}"):
        reg.query(Z[0][:47], 3)
    with pytest.raises(NonFiniteError):
        reg.query(np.full(DIM, np.nan), 3)
    with pytest.raises(RegistryError, match="positive integer"):
        reg.query(Z[0], 0)


def test_list_filters_and_get(filled):
    reg, _, Z, ids = filled
    assert len(reg.list()) == 1000
    ct = reg.list(task="ct-head")
    assert len(ct) == 333 and all(r.meta.task == "ct-head" for r in ct)
    both = reg.list(task="ct-head", modality="ct", site="b")
    assert both and all((r.meta.task, r.meta.modality, r.meta.site) == ("ct-head", "ct", "b") for r in both)
    assert reg.list(base=BASE2) == []
    r = reg.get(ids[10])
    np.testing.assert_array_equal(r.z, Z[10])
    assert r.meta.rank == 2 and r.meta.created_at and r.meta.extra == {"i": 10}
    with pytest.raises(RecordNotFoundError):
        reg.get("nope")


def test_reopen_gives_same_answers(tmp_path):
    rng = np.random.default_rng(5)
    Z = rng.standard_normal((30, DIM)).astype(np.float32)
    root = tmp_path / "r"
    reg = new_registry(root)
    for i in range(30):
        reg.add(make_adapter(i), Z[i], make_meta(i))
    removed = reg.list(site="c")[0].id
    reg.remove(removed, reason="site withdrew")
    q = rng.standard_normal(DIM)
    before = [(h.record.id, h.distance) for h in reg.query(q, 7, exclude_site="a")]
    ids_before = reg.ids()
    reg.close()
    with Registry(root) as again:
        assert len(again) == 29 and again.ids() == ids_before and removed not in again
        assert [(h.record.id, h.distance) for h in again.query(q, 7, exclude_site="a")] == before
        assert again.index_ready and again._index.collection.count() == 29
        adapter = again.load_adapter(ids_before[0])
        assert adapter_to_bytes(adapter) == adapter_to_bytes(make_adapter(0))
        assert again.verify(full=True) == []


def test_base_filter_and_add_base(tmp_path):
    with new_registry(tmp_path / "r") as reg:
        reg.add_base(BASE2, SHAPES2, name="other-model")
        z = np.ones(DIM, dtype=np.float32)
        r1 = reg.add(make_adapter(1), z, make_meta(0))
        r2 = reg.add(make_adapter(2, shapes=SHAPES2), z * 2, make_meta(1, base_fingerprint=BASE2))
        assert [r.id for r in reg.list(base=BASE2)] == [r2.id]
        assert [h.record.id for h in reg.query(z * 2, 1, base=BASE)] == [r1.id]
        # shapes are checked against the adapter's own base
        with pytest.raises(ShapeMismatchError):
            reg.add(make_adapter(3), z, make_meta(2, base_fingerprint=BASE2))
        with pytest.raises(RegistryError, match="different module shapes"):
            reg.add_base(BASE2, SHAPES)


def test_idempotent_resubmission(tmp_path):
    root = tmp_path / "r"
    with new_registry(root) as reg:
        z = np.arange(DIM, dtype=np.float32)
        blob = adapter_to_bytes(make_adapter(1))
        first = reg.add(blob, z, make_meta(0), expected_sha256=hashlib.sha256(blob).hexdigest())
        snap = state(root)
        again = reg.add(make_adapter(1), z.astype(np.float64), make_meta(0))  # object or bytes: same blob
        assert again.id == first.id and again.meta.created_at == first.meta.created_at
        assert state(root) == snap and len(reg) == 1
        assert audit_lines(root)[-1]["duplicate"] is True
        # same content, different metadata: refused, not silently dropped
        with pytest.raises(DuplicateRecordError, match="sample_count"):
            reg.add(blob, z, make_meta(0, sample_count=999))
        assert state(root) == snap
        # per-run extras (e.g. a signature over a fresh nonce) do not break idempotency
        same = reg.add(blob, z, make_meta(0, extra={"signature": "run-2"}))
        assert same.id == first.id and same.meta.extra == {"i": 0} and state(root) == snap
        # another site (or z) with the same blob is a new record sharing the blob
        other = reg.add(blob, z, make_meta(1))
        assert other.id != first.id and other.blob_sha256 == first.blob_sha256 and len(reg) == 2
        # removed then resubmitted: back, same id
        reg.remove(first.id)
        assert reg.add(blob, z, make_meta(0)).id == first.id and len(reg) == 2
        # bulk with repeats inside the batch and against the registry
        out = reg.add_many([(blob, z, make_meta(0)), (blob, z + 1, make_meta(2)), (blob, z + 1, make_meta(2))])
        assert out[0].id == first.id and out[1].id == out[2].id and len(reg) == 3


def _rewrite_header(tag: str | None = None, spaced: bool = False) -> bytes:
    """A blob with a hand-edited safetensors header: another dtype claimed, or valid but spaced JSON."""
    blob = adapter_to_bytes(make_adapter(1))
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    for k, v in header.items():
        if k != "__metadata__" and tag:
            v["dtype"] = tag
    raw = json.dumps(header, sort_keys=True, separators=(", ", ": ") if spaced else (",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n :]


def _nan_adapter(value: float) -> LoraAdapter:
    a = make_adapter(4)
    a.modules["model.layers.0.self_attn.v_proj"].B[3, 1] = value
    return a


def _scaled_adapter(factor: float) -> LoraAdapter:
    a = make_adapter(5)
    for m in a.modules.values():
        m.B = m.B * factor
    return a


def _rejections():
    good_z = np.zeros(DIM, dtype=np.float32)
    wrong_shape = make_adapter(1)
    m = wrong_shape.modules["model.layers.0.self_attn.q_proj"]
    wrong_shape.modules["model.layers.0.self_attn.q_proj"] = LoraModule(torch.randn(2, 25), torch.randn(32, 2))
    wrong_name = make_adapter(1)
    wrong_name.modules["model.layers.7.self_attn.q_proj"] = m
    blob = adapter_to_bytes(make_adapter(1))
    nan_z = good_z.copy()
    nan_z[3] = np.inf
    return [
        ("shape", (wrong_shape, good_z, make_meta(1)), {}, ShapeMismatchError, r"A \(2, 25\).*in=24"),
        (
            "module",
            (wrong_name, good_z, make_meta(1)),
            {},
            UnknownModuleError,
            "model.layers.7.self_attn.q_proj' does not exist",
        ),
        ("nan", (_nan_adapter(float("nan")), good_z, make_meta(1)), {}, NonFiniteError, r"lora_B has 1 .*NaN"),
        ("inf", (adapter_to_bytes(_nan_adapter(float("inf"))), good_z, make_meta(1)), {}, NonFiniteError, "Inf"),
        ("dtype-obj", (make_adapter(1, dtype=torch.float64), good_z, make_meta(1)), {}, DtypeError, "float64"),
        ("dtype-bytes", (_rewrite_header("I32"), good_z, make_meta(1)), {}, DtypeError, "dtype I32"),
        (
            "dim",
            (blob, np.zeros(DIM + 3), make_meta(1, site="b")),
            {},
            EmbeddingDimensionError,
            f"site 'b' sent {DIM + 3} values, the registry holds {DIM}",
        ),
        ("z-2d", (blob, np.zeros((1, DIM)), make_meta(1)), {}, EmbeddingDimensionError, "1-D"),
        ("z-inf", (blob, nan_z, make_meta(1)), {}, NonFiniteError, r"non-finite value\(s\).*index \[3\]"),
        ("z-overflow", (blob, np.full(DIM, 1e300), make_meta(1)), {}, NonFiniteError, "float32"),
        (
            "z-norm",
            (blob, np.full(DIM, 1e30, np.float32), make_meta(1)),
            {},
            NormError,
            r"z with norm 6\.93e\+30, above the registry's cap 1e\+06",
        ),
        (
            "delta-norm",
            (_scaled_adapter(1e6), good_z, make_meta(1)),
            {},
            NormError,
            r"‖scale·B·A‖_F = .*e\+0[78], above the registry's cap 1e\+04",
        ),
        (
            "base",
            (blob, good_z, make_meta(1, base_fingerprint="sha256:unknown")),
            {},
            UnknownBaseError,
            "sha256:unknown is not accepted",
        ),
        ("hash", (blob, good_z, make_meta(1)), {"expected_sha256": "0" * 64}, BlobHashMismatchError, "announced 0000"),
        (
            "hash-obj",
            (make_adapter(1), good_z, make_meta(1)),
            {"expected_sha256": "1" * 64},
            BlobHashMismatchError,
            "announced 1111",
        ),
        (
            "meta-type",
            (blob, good_z, make_meta(1, sample_count="10")),
            {},
            MetadataError,
            "'sample_count' must be an integer; got str",
        ),
        ("meta-bool", (blob, good_z, make_meta(1, sample_count=True)), {}, MetadataError, "sample_count"),
        ("meta-site", (blob, good_z, make_meta(1, site=3)), {}, MetadataError, "'site' must be a string"),
        (
            "meta-unknown",
            (
                blob,
                good_z,
                {
                    "site": "a",
                    "task": "t",
                    "modality": "m",
                    "base_fingerprint": BASE,
                    "sample_count": 1,
                    "colour": "red",
                },
            ),
            {},
            MetadataError,
            "colour",
        ),
        ("meta-extra", (blob, good_z, make_meta(1, extra={"x": object()})), {}, MetadataError, "JSON values"),
        (
            "oversize",
            (adapter_to_bytes(make_adapter(1, rank=40)), good_z, make_meta(1)),
            {},
            PayloadTooLargeError,
            "cap is 20000",
        ),
        ("oversize-obj", (make_adapter(1, rank=40), good_z, make_meta(1)), {}, PayloadTooLargeError, "cap is 20000"),
        (
            "rank",
            (make_adapter(1, rank=20, modules=["model.layers.0.self_attn.v_proj"]), good_z, make_meta(1)),
            {},
            RankError,
            r"rank 20; the registry accepts 1\.\.16",
        ),
        ("format", (b"not a safetensors blob at all", good_z, make_meta(1)), {}, AdapterFormatError, "safetensors"),
        ("non-canonical", (_rewrite_header(spaced=True), good_z, make_meta(1)), {}, AdapterFormatError, "canonical"),
    ]


@pytest.fixture(scope="module")
def small_reg(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "reg"
    reg = new_registry(root, limits={"max_blob_bytes": 20000, "max_rank": 16})
    rng = np.random.default_rng(0)
    for i in range(5):
        reg.add(make_adapter(10 + i), rng.standard_normal(DIM), make_meta(i))
    yield reg, root
    reg.close()


@pytest.mark.parametrize("case", _rejections(), ids=lambda c: c[0])
def test_rejection_changes_nothing(small_reg, case):
    name, args, kwargs, err, pattern = case
    reg, root = small_reg
    before = state(root)
    n_audit = len(audit_lines(root))
    with pytest.raises(err, match=pattern) as info:
        reg.add(*args, **kwargs)
    assert isinstance(info.value, ValidationError)
    assert state(root) == before, "a rejected submission changed records.jsonl, blobs/ or chroma/"
    after = audit_lines(root)
    assert len(after) == n_audit + 1
    assert after[-1]["event"] == "submission.rejected" and after[-1]["error"] == err.__name__
    assert after[-1]["reason"] == str(info.value)
    assert len(reg) == 5


def test_audit_fields_join_the_registry_entry(small_reg):
    """A caller (the ServerApp) attaches what it knows about the wire message to our one entry."""
    reg, root = small_reg
    wire = {"run_id": "run-1", "nonce": "n-1", "record_digests": {"meta": "ab" * 32}}
    with pytest.raises(EmbeddingDimensionError):
        reg.add(make_adapter(1), np.zeros(DIM + 1), make_meta(1), audit_fields=wire)
    last = audit_lines(root)[-1]
    assert last["event"] == "submission.rejected" and last["run_id"] == "run-1" and last["nonce"] == "n-1"
    rec = reg.add(make_adapter(77), np.full(DIM, 0.5), make_meta(2), audit_fields={**wire, "site": "forged"})
    last = audit_lines(root)[-1]
    assert last["event"] == "submission.accepted" and last["record_id"] == rec.id
    assert last["run_id"] == "run-1" and last["site"] == "c"  # the registry's own fields win
    reg.remove(rec.id)


def test_bulk_rejection_changes_nothing(small_reg):
    reg, root = small_reg
    before = state(root)
    good = (make_adapter(1), np.zeros(DIM), make_meta(1))
    bad = (make_adapter(1), np.zeros(DIM - 1), make_meta(2))
    with pytest.raises(EmbeddingDimensionError, match="^item 1: site"):
        reg.add_many([good, bad])
    assert state(root) == before and len(reg) == 5


def test_chroma_deleted_or_corrupted_is_rebuilt(tmp_path):
    rng = np.random.default_rng(11)
    Z = rng.standard_normal((200, DIM)).astype(np.float32)
    root = tmp_path / "r"
    with new_registry(root) as reg:
        ids = [r.id for r in reg.add_many([(make_adapter(i % 7), Z[i], make_meta(i)) for i in range(200)])]
    q = Z[17] + 0.05

    def check() -> None:
        with Registry(root) as reg:
            assert reg.index_ready and reg._index.collection.count() == 200
            for method in ("index", "brute"):
                order, _ = brute_force(Z, q, 9)
                assert [h.record.id for h in reg.query(q, 9, method=method)] == [ids[o] for o in order]

    shutil.rmtree(root / "chroma")
    check()
    # garbage over every index file (sqlite and HNSW segments)
    for p in (root / "chroma").rglob("*"):
        if p.is_file():
            p.write_bytes(os.urandom(max(64, p.stat().st_size // 2)))
    check()
    # a stale index: vectors missing and a foreign id present
    with Registry(root) as reg:
        reg._index.collection.delete(ids=ids[:30])
        reg._index.collection.upsert(
            ids=["ghost"], embeddings=[np.zeros(DIM, dtype=np.float32)], metadatas=[{"site": "x"}]
        )
    check()
    assert any(e["event"] == "registry.reindex" for e in audit_lines(root))


def test_torn_record_line_is_truncated(tmp_path):
    root = tmp_path / "r"
    with new_registry(root) as reg:
        ids = [reg.add(make_adapter(i), np.full(DIM, i, dtype=np.float32), make_meta(i)).id for i in range(3)]
    records = root / "records.jsonl"
    good = records.read_bytes()
    with open(records, "ab") as fh:
        fh.write(good.splitlines(keepends=True)[-1][:57])  # a crash mid-append
    with Registry(root) as reg:
        assert reg.ids() == ids
    assert records.read_bytes() == good
    assert audit_lines(root)[-1]["event"] == "registry.recover"
    # damage in the middle is not guessed about
    lines = good.splitlines(keepends=True)
    records.write_bytes(lines[0] + b"{garbage\n" + b"".join(lines[1:]))
    with pytest.raises(RegistryError, match="line 2"):
        Registry(root)


def test_blob_reverified_on_read_and_gc(tmp_path):
    root = tmp_path / "r"
    with new_registry(root) as reg:
        r = reg.add(make_adapter(1), np.zeros(DIM), make_meta(0))
        keep = reg.add(make_adapter(2), np.ones(DIM), make_meta(1))
        path = reg.blob_path(r.id)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        os.chmod(path, 0o644)
        path.write_bytes(bytes(data))
        with pytest.raises(BlobCorruptError, match="altered"):
            reg.load_adapter(r.id)
        assert any("content does not match" in p for p in reg.verify(full=True))
        reg.remove(r.id)
        orphan = root / "blobs" / "sha256" / "ee" / ("ee" * 32)
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"x")
        assert sorted(reg.gc()) == sorted([r.blob_sha256, "ee" * 32])
        assert reg.load_adapter(keep.id) is not None and reg.verify(full=True) == []


def test_init_after_interrupted_init(tmp_path):
    """init writes registry.json last; its leftovers from a crash do not block a second init."""
    root = tmp_path / "r"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "records.jsonl").write_bytes(b"")
    (root / ".tmp-registry.json-x").write_bytes(b"{")
    with new_registry(root) as reg:
        assert len(reg) == 0
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(RegistryError, match="not empty"):
        new_registry(other)
