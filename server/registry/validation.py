"""Pure checks of a submission: z, metadata, adapter bytes/header/modules. No I/O, no state.

Every check raises a ``ValidationError`` subclass whose message names the site, what was wrong
and what to do; ``prepare`` runs them all and returns what would be written, so the registry can
validate a whole batch before it writes anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.adapters.safetensors_header import SafetensorsHeaderError, check_sizes, parse_header
from common.files.safeio import UnsafeInputError, check_name
from common.trust.digests import canonical_json, sha256_hex, z_sha256
from server.registry.errors import (
    AdapterFormatError,
    BlobHashMismatchError,
    DtypeError,
    DuplicateRecordError,
    EmbeddingDimensionError,
    MetadataError,
    NonFiniteError,
    NormError,
    PayloadTooLargeError,
    RankError,
    ShapeMismatchError,
    UnknownBaseError,
    UnknownModuleError,
)
from server.registry.records import AdapterMeta, Prepared

#: safetensors dtype tag -> accepted adapter dtype
ALLOWED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_ID_HASH_LEN = 16
_TEXT_MAX = 128
#: the key of a record's update norms in its stored metadata (computed by the registry, never taken
#: from the site; kept out of ``AdapterMeta``, which is what the site said)
NORMS_KEY = "update_norms"


def normalize_sha(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BlobHashMismatchError(f"{what} must be a sha256 hex string; got {type(value).__name__}")
    v = value.strip().lower().removeprefix("sha256:")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise BlobHashMismatchError(f"{what} {value!r} is not a sha256 (64 hex digits)")
    return v


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL (one C-level scan, not a loop per character)


def _check_text(name: str, value: Any, site: str) -> None:
    if not isinstance(value, str):
        raise MetadataError(f"site {site!r}: metadata field {name!r} must be a string; got {type(value).__name__}")
    if not value or len(value) > _TEXT_MAX or value != value.strip():
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must be 1–{_TEXT_MAX} characters without "
            "leading/trailing "
            f"spaces; got {value[:40]!r}"
        )
    if _CONTROL_CHARS.search(value):
        raise MetadataError(f"site {site!r}: metadata field {name!r} contains control characters")


def _check_name(name: str, value: str, site: str) -> str:
    """A name that ends up in record ids and audit reports: NFC-normalised (so "é" and "e\u0301" are one
    site), no control, bidi-override or zero-width characters (``common.files.safeio.check_name``)."""
    try:
        return check_name(value, f"metadata field {name!r}", max_length=_TEXT_MAX)
    except UnsafeInputError as exc:
        raise MetadataError(f"site {site!r}: {exc}") from None


def _check_count(name: str, value: Any, site: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must be an integer; got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise MetadataError(f"site {site!r}: metadata field {name!r} must be >= {minimum}; got {value}")


def _check_json_value(name: str, value: Any, site: str) -> Any:
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise MetadataError(
            f"site {site!r}: metadata field {name!r} must hold JSON values only (str, finite numbers, bool, "
            f"None, lists, dicts with string keys): {exc}"
        ) from exc


def core_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata that must match for a re-submission to count as the same one. ``extra`` is
    left out on purpose: it carries per-run values (signatures over a nonce, timings) that differ
    on an honest re-submission; ``created_at`` is the registry's own."""
    return {k: v for k, v in meta.items() if k not in ("created_at", "extra")}


def check_z(z: Any, who: str, dim: int, representation: str, max_z_norm: float) -> np.ndarray:
    """``z`` as a contiguous float32 vector of ``dim`` values, or a typed error naming ``who``."""
    try:
        arr = to_numpy(z)
    except Exception as exc:  # noqa: BLE001 - anything unconvertible is a bad z
        raise EmbeddingDimensionError(f"{who} sent a z that is not an array ({exc})") from exc
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise EmbeddingDimensionError(f"{who} sent z of dtype {arr.dtype}; expected a float vector")
    if arr.ndim != 1:
        raise EmbeddingDimensionError(
            f"{who} sent z of shape {tuple(arr.shape)}; expected a 1-D vector of {dim} values"
        )
    if arr.shape[0] != dim:
        raise EmbeddingDimensionError(
            f"{who} sent {arr.shape[0]} values, the registry holds {dim} "
            f"({representation!r}); compute z with the registry's representation/layer"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        z32 = arr.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(z32))
    if bad.size:
        raise NonFiniteError(
            f"{who} sent z with {bad.size} non-finite value(s) (NaN/Inf after the cast to float32) at "
            f"index {bad[:5].tolist()}; recompute the embedding"
        )
    norm = float(np.linalg.norm(z32.astype(np.float64)))
    cap = float(max_z_norm)
    if norm > cap:
        raise NormError(
            f"{who} sent z with norm {norm:.3g}, above the registry's cap {cap:.3g} (limits.max_z_norm); "
            "check the embedding pipeline (layer, pooling, dtype)"
        )
    return np.ascontiguousarray(z32)


def check_meta(meta: AdapterMeta | Mapping[str, Any], limits: Mapping[str, float]) -> dict[str, Any]:
    """The metadata as the dict a record line stores (rank/created_at still None), checked."""
    m = meta if isinstance(meta, AdapterMeta) else AdapterMeta.from_dict(meta)
    site = m.site if isinstance(m.site, str) else "?"
    _check_text("site", m.site, site)
    for name in ("task", "modality", "base_fingerprint"):
        _check_text(name, getattr(m, name), site)
    names = {name: _check_name(name, getattr(m, name), site) for name in ("site", "task", "modality")}
    _check_count("sample_count", m.sample_count, site, 1)
    if m.token_count is not None:
        _check_count("token_count", m.token_count, site, 0)
    if isinstance(m.privacy, str):
        _check_text("privacy", m.privacy, site)
    elif not isinstance(m.privacy, dict):
        raise MetadataError(
            f"site {site!r}: metadata field 'privacy' must be a string such as 'none' or a dict; "
            f"got {type(m.privacy).__name__}"
        )
    if not isinstance(m.extra, dict):
        raise MetadataError(f"site {site!r}: metadata field 'extra' must be a dict; got {type(m.extra).__name__}")
    out = {
        **names,
        "base_fingerprint": m.base_fingerprint,
        "sample_count": int(m.sample_count),
        "token_count": None if m.token_count is None else int(m.token_count),
        "rank": None,
        "privacy": _check_json_value("privacy", m.privacy, site),
        "created_at": None,
        "extra": _check_json_value("extra", m.extra, site),
    }
    size = len(canonical_json(out))
    if size > limits["max_meta_bytes"]:
        raise PayloadTooLargeError(
            f"site {site!r}: metadata is {size} bytes, the cap is {limits['max_meta_bytes']}; keep "
            "only "
            "small fields in 'extra'"
        )
    return out


_HEADER_PROBLEM = {
    "short": "adapter blob is too short to be safetensors",
    "length": "adapter blob has a truncated or oversized safetensors header",
    "json": "adapter blob has an unreadable safetensors header",
    "object": "adapter blob's safetensors header is not a JSON object",
    "layout": "adapter blob is not valid safetensors",
}


_LAYOUT_HINT = (
    "the registry accepts only common.adapters.lora.adapter_to_bytes(adapter) (a PEFT directory: load it with "
    "common.adapters.lora.load_peft_adapter first; resend if the blob was cut in transit)"
)


def _format_error(site: str, exc: SafetensorsHeaderError) -> AdapterFormatError:
    what = _HEADER_PROBLEM.get(exc.kind, _HEADER_PROBLEM["layout"])
    hint = _LAYOUT_HINT if exc.kind == "layout" else "send exactly common.adapters.lora.adapter_to_bytes(adapter)"
    return AdapterFormatError(f"site {site!r}: {what} ({exc}); {hint}")


def check_adapter(
    adapter: Any, site: str, base: str, shapes: Mapping[str, Any], limits: Mapping[str, float]
) -> tuple[bytes, int, Any, dict[str, float]]:
    """Validate an adapter (LoraAdapter or canonical bytes) against ``base``; returns (blob, max rank,
    the parsed ``LoraAdapter``, its update norms as ``check_modules`` gives them)."""
    from common.adapters import (  # lazy: torch; listing or verifying a registry never validates an adapter
        LoraAdapter,
        LoraFormatError,
        adapter_from_bytes,
        adapter_to_bytes,
        canonical_head,
    )

    lim = limits
    max_bytes = lim["max_blob_bytes"]
    if isinstance(adapter, (bytes, bytearray, memoryview)):
        blob = bytes(adapter)
        if len(blob) > max_bytes:
            raise PayloadTooLargeError(
                f"site {site!r}: adapter blob is {len(blob)} bytes, the registry cap is {max_bytes}; "
                "lower the "
                "rank or the number of target modules"
            )
        try:
            header = parse_header(blob)
        except SafetensorsHeaderError as exc:
            raise _format_error(site, exc) from None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            tag = info.get("dtype") if isinstance(info, dict) else None
            if tag not in ALLOWED_DTYPES:
                raise DtypeError(f"site {site!r}: tensor {key} has dtype {tag}; accepted: float32, bfloat16, float16")
        try:
            check_sizes(header)
        except SafetensorsHeaderError as exc:
            raise _format_error(site, exc) from None
        try:
            parsed = adapter_from_bytes(blob)
        except LoraFormatError as exc:
            raise AdapterFormatError(
                f"site {site!r}: {exc}; the registry accepts only common.adapters.lora.adapter_to_bytes(adapter) "
                "(a PEFT directory: load it with common.adapters.lora.load_peft_adapter first; resend if the blob "
                "was cut in transit)"
            ) from exc
        norms = check_modules(parsed, site, base, shapes, limits)
        # canonical iff the head is: the tensors were read from this blob by its own header, so
        # the data bytes re-encode to themselves (re-encoding whole was 12 % of an insert, issue 14)
        try:
            head = canonical_head(parsed)
        except (LoraFormatError, KeyError) as exc:
            raise AdapterFormatError(f"site {site!r}: adapter cannot be re-encoded ({exc})") from exc
        if (
            len(head) + sum(m.A.nbytes + m.B.nbytes for m in parsed.modules.values()) != len(blob)
            or blob[: len(head)] != head
        ):
            raise AdapterFormatError(
                f"site {site!r}: adapter blob is not in canonical form; encode it with "
                "common.adapters.lora.adapter_to_bytes (its sha256 is the adapter's id)"
            )
        return blob, max(m.rank for m in parsed.modules.values()), parsed, norms
    if not isinstance(adapter, LoraAdapter):
        raise AdapterFormatError(
            f"site {site!r}: adapter must be a common.adapters.lora.LoraAdapter or its canonical bytes; got "
            f"{type(adapter).__name__}"
        )
    for name, m in adapter.modules.items():
        for label, t in (("A", m.A), ("B", m.B)):
            dt = str(t.dtype).removeprefix("torch.")
            if dt not in ALLOWED_DTYPES.values():
                raise DtypeError(
                    f"site {site!r}: module {name} lora_{label} has dtype {dt}; accepted: float32, bfloat16, float16"
                )
    est = sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in adapter.modules.values())
    if est > max_bytes:
        raise PayloadTooLargeError(
            f"site {site!r}: adapter tensors are {est} bytes, the registry cap is {max_bytes}; lower the "
            "rank or the number of target modules"
        )
    norms = check_modules(adapter, site, base, shapes, limits)
    blob = adapter_to_bytes(adapter)
    if len(blob) > max_bytes:
        raise PayloadTooLargeError(
            f"site {site!r}: adapter blob is {len(blob)} bytes, the registry cap is {max_bytes}; lower "
            "the rank "
            "or the number of target modules"
        )
    return blob, max(m.rank for m in adapter.modules.values()), adapter, norms


def check_modules(
    adapter: Any, site: str, base: str, shapes: Mapping[str, Any], limits: Mapping[str, float]
) -> dict[str, float]:
    """Every module exists in the base, fits its shape, has a sane rank, finite factors and ‖ΔW‖.

    Returns the per-module update norms ``‖scale·B·A‖_F`` plus ``"__total__"`` (what
    ``server.bounds.adapter_norms`` computes; computed once here for the insert path)."""
    import torch  # lazy: only an add needs it; opening a registry stays torch-free

    lim = limits
    norms: dict[str, float] = {}
    if not adapter.modules:
        raise AdapterFormatError(f"site {site!r}: adapter has no modules")
    if len(adapter.modules) > lim["max_modules"]:
        raise PayloadTooLargeError(
            f"site {site!r}: adapter has {len(adapter.modules)} modules, the cap is {lim['max_modules']}"
        )
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        if name not in shapes:
            near = [s for s in shapes if s.split(".")[-1] == name.split(".")[-1]][:3]
            raise UnknownModuleError(
                f"site {site!r}: module {name!r} does not exist in base {base}"
                + (f" (e.g. {near})" if near else "")
                + "; module names are base-model paths such as 'model.layers.0.self_attn.q_proj'"
            )
        out, inp = shapes[name]
        r = int(m.A.shape[0])
        if tuple(m.A.shape) != (r, inp) or tuple(m.B.shape) != (out, r):
            raise ShapeMismatchError(
                f"site {site!r}: module {name}: A {tuple(m.A.shape)} / B {tuple(m.B.shape)} do not fit "
                "the base "
                f"module (out={out}, in={inp}); expected A [r, {inp}] and B [{out}, r] — was the adapter "
                "trained on another base model?"
            )
        if r < 1 or r > lim["max_rank"]:
            raise RankError(f"site {site!r}: module {name} has rank {r}; the registry accepts 1..{lim['max_rank']}")
        if not math.isfinite(m.scale):
            raise NonFiniteError(f"site {site!r}: module {name} has a non-finite scale {m.scale}")
        # ‖s·B·A‖_F² = s²·trace((BᵀB)(AAᵀ)): two r×r products, never the dense out×in update. It is
        # also the finiteness check: a NaN/Inf entry makes a diagonal of AAᵀ or BᵀB non-finite and so
        # the trace (float64 squares of float32/16 values cannot overflow), so the element-wise scan
        # runs only to word the error (it was 15 % of an insert, issue 14).
        A64, B64 = m.A.to(torch.float64), m.B.to(torch.float64)
        trace = float(torch.trace((B64.T @ B64) @ (A64 @ A64.T)))
        if not math.isfinite(trace):
            _raise_non_finite(site, name, m)
        norm = abs(m.scale) * math.sqrt(max(trace, 0.0))
        norms[name] = norm
        cap = float(lim["max_delta_norm"])
        if not norm <= cap:
            raise NormError(
                f"site {site!r}: module {name} has ‖scale·B·A‖_F = {norm:.3g}, above the registry's cap "
                f"{cap:.3g} (limits.max_delta_norm); the training diverged or the factors were scaled — "
                "retrain before submitting"
            )
    norms["__total__"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def _raise_non_finite(site: str, name: str, m: Any) -> None:
    import torch  # lazy: only an add needs it; opening a registry stays torch-free

    for label, t in (("A", m.A), ("B", m.B)):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            nbad = int((~finite).sum())
            kinds = [k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if bool(f(t).any())]
            raise NonFiniteError(
                f"site {site!r}: module {name} lora_{label} has {nbad} non-finite value(s) "
                f"({'/'.join(kinds)}); the training diverged — retrain (lower lr) before submitting"
            )
    raise NonFiniteError(
        f"site {site!r}: module {name}: ‖scale·B·A‖_F overflows float64; the factors are "
        "far too large — retrain before submitting"
    )


def prepare(
    adapter: Any,
    z: Any,
    meta: AdapterMeta | Mapping[str, Any],
    expected_sha256: str | None,
    *,
    bases: Mapping[str, Any],
    limits: Mapping[str, float],
    dim: int,
    representation: str,
) -> Prepared:
    """Validate everything; raise a ValidationError or return what will be written."""
    m = check_meta(meta, limits)
    site = m["site"]
    who = f"site {site!r}"
    if m["base_fingerprint"] not in bases:
        known = ", ".join(sorted(bases)) or "none"
        raise UnknownBaseError(
            f"{who}: base model fingerprint {m['base_fingerprint']} is not accepted by this registry "
            "(known: "
            f"{known}); train on the registry's base model, or add it with Registry.add_base"
        )
    z32 = check_z(z, who, dim, representation, limits["max_z_norm"])
    expected = None if expected_sha256 is None else normalize_sha(expected_sha256, f"{who}: expected_sha256")
    if expected is not None and isinstance(adapter, (bytes, bytearray, memoryview)):
        got = sha256_hex(bytes(adapter))
        if got != expected:
            raise BlobHashMismatchError(
                f"{who}: adapter blob hashes to {got} but the submission announced {expected}; the "
                "adapter was "
                "altered or truncated in transit — resend it"
            )
    blob, rank, _, norms = check_adapter(
        adapter, site, m["base_fingerprint"], bases[m["base_fingerprint"]]["modules"], limits
    )
    sha = sha256_hex(blob)
    if expected is not None and sha != expected:
        raise BlobHashMismatchError(
            f"{who}: adapter blob hashes to {sha} but the submission announced {expected}; the adapter "
            "was "
            "altered in transit, or the site hashed something other than common.adapters.lora.adapter_to_bytes"
        )
    m["rank"] = rank
    # per-module ‖ΔW‖, computed here (never taken from the site): what the relative bound of
    # server/bounds.py compares against, for this record and every later one
    m[NORMS_KEY] = {k: float(f"{v:.6g}") for k, v in norms.items()}
    z_sha = z_sha256(z32)
    key = sha256_hex(canonical_json([site, m["task"], sha, z_sha]).encode())[:_ID_HASH_LEN]
    rid = f"{site}:{m['task']}:{key}"
    return Prepared(rid, z32, m, blob, sha, z_sha)


def check_same(old: Mapping[str, Any], new: Prepared) -> None:
    """A re-submission of record ``new.id`` must repeat its core metadata (``DuplicateRecordError``)."""
    a, b = core_meta(old), core_meta(new.meta)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise DuplicateRecordError(
            f"site {new.meta['site']!r}: record {new.id} already holds this adapter and z with different metadata "
            f"(fields {diff}); resubmit the identical metadata, or remove {new.id} first"
        )
