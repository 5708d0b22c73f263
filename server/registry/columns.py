"""The registry's in-memory columns: every z in one float32 matrix, metadata as integer codes.

Why columns: a query must filter by task/modality/base/site and rank thousands of z without
building a Python object per record, so each record is a *row*: ``Z[row]`` (float32), ``n2[row]``
(its squared norm), ``live[row]``, one int32 code per filterable field, and the stored metadata.
Rows are appended as records.jsonl is replayed and reused when a removed id is added again.
Masks (``mask``) and counts (``distinct``) are numpy operations over the codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server.registry.errors import RecordNotFoundError, RegistryCorruptError
from server.registry.records import AdapterMeta, Record

#: filterable key -> metadata field
KEYS = {"site": "site", "task": "task", "modality": "modality", "base": "base_fingerprint"}


class Columns:
    """Rows of records for an embedding dimension ``dim``; ``source`` names the log in errors.

    ``on_rows(rows)`` (optional) is told which rows got a new z, e.g. to keep a projection current.
    """

    def __init__(self, dim: int, source: str) -> None:
        self.dim = dim
        self.source = source
        self.n = 0
        self.n_live = 0
        self.Z = np.zeros((0, dim), dtype=np.float32)
        self.n2 = np.zeros(0, dtype=np.float64)
        self.live = np.zeros(0, dtype=bool)
        self.codes: dict[str, np.ndarray] = {k: np.zeros(0, dtype=np.int32) for k in KEYS}
        self.vocab: dict[str, dict[str, int]] = {k: {} for k in KEYS}
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.meta: list[dict[str, Any]] = []
        self.blob: list[tuple[str, int, str]] = []  # (sha, bytes, z_sha)
        self.on_rows: Callable[[np.ndarray], None] | None = None

    def ensure_capacity(self, extra: int) -> None:
        """Room for ``extra`` more rows (capacity doubles, so appends stay amortised O(1))."""
        need = self.n + extra
        cap = self.Z.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2, 64)

        def grow(a: np.ndarray) -> np.ndarray:
            out = np.zeros((new_cap,) + a.shape[1:], dtype=a.dtype)
            out[: self.n] = a[: self.n]
            return out

        self.Z = grow(self.Z)
        self.n2 = grow(self.n2)
        self.live = grow(self.live)
        for k in self.codes:
            self.codes[k] = grow(self.codes[k])

    def _code(self, key: str, value: str) -> int:
        vocab = self.vocab[key]
        c = vocab.get(value)
        if c is None:
            c = vocab[value] = len(vocab)
        return c

    def apply_adds(self, items: Sequence[tuple[str, dict[str, Any], str, int, str]], Z: np.ndarray) -> list[int]:
        """Put records ``(id, meta, blob sha, bytes, z sha)`` with their z into rows; returns the rows."""
        self.ensure_capacity(len(items))
        rows: list[int] = []
        for (rid, meta, sha, nbytes, zsha), z in zip(items, Z, strict=True):
            row = self.row.get(rid)
            if row is None:
                row = self.n
                self.n += 1
                self.row[rid] = row
                self.ids.append(rid)
                self.meta.append(meta)
                self.blob.append((sha, nbytes, zsha))
            else:
                if self.live[row]:
                    raise RegistryCorruptError(f"{self.source}: record {rid} is added twice")
                self.meta[row] = meta
                self.blob[row] = (sha, nbytes, zsha)
            self.Z[row] = z
            self.live[row] = True
            self.n_live += 1
            for key, mkey in KEYS.items():
                self.codes[key][row] = self._code(key, meta[mkey])
            rows.append(row)
        if rows:
            r = np.asarray(rows)
            zr = self.Z[r]
            self.n2[r] = np.einsum("ij,ij->i", zr, zr)  # float32 sum: its error is in search's bound
            if self.on_rows is not None:
                self.on_rows(r)
        return rows

    def apply_remove(self, rid: str) -> None:
        """Mark record ``rid`` removed (its row stays, for a later re-add)."""
        row = self.row.get(rid)
        if row is None or not self.live[row]:
            raise RegistryCorruptError(f"{self.source}: removal of unknown record {rid}")
        self.live[row] = False
        self.n_live -= 1

    # ---- reading ----------------------------------------------------------------------------

    def live_row(self, rid: object, where: str) -> int:
        """The row of live record ``rid`` (``RecordNotFoundError`` naming ``where`` otherwise)."""
        row = self.row.get(rid) if isinstance(rid, str) else None
        if row is None or not self.live[row]:
            raise RecordNotFoundError(f"no record {rid!r} in {where}; see `rpe registry ls`")
        return row

    def has(self, rid: object) -> bool:
        """True if ``rid`` is a live record."""
        row = self.row.get(rid) if isinstance(rid, str) else None
        return row is not None and bool(self.live[row])

    def record(self, row: int) -> Record:
        """The ``Record`` of a row (copies: callers cannot change the columns through it)."""
        meta = dict(self.meta[row])
        meta.pop("update_norms", None)  # the registry's own measurement, not part of what the site said
        meta["extra"] = dict(meta.get("extra") or {})
        sha, nbytes, zsha = self.blob[row]
        return Record(self.ids[row], self.Z[row].copy(), AdapterMeta(**meta), sha, nbytes, zsha)

    def live_rows(self) -> np.ndarray:
        """Rows of live records, in insertion order."""
        return np.flatnonzero(self.live[: self.n])

    def mask(self, task: str | None = None, modality: str | None = None, base: str | None = None,
             site: str | None = None, exclude_site: str | None = None) -> np.ndarray:
        """Boolean mask over rows: live and matching every given filter."""
        n = self.n
        mask = self.live[:n].copy()
        for key, value in (("task", task), ("modality", modality), ("base", base), ("site", site)):
            if value is None:
                continue
            code = self.vocab[key].get(value)
            if code is None:
                return np.zeros(n, dtype=bool)
            mask &= self.codes[key][:n] == code
        if exclude_site is not None:
            code = self.vocab["site"].get(exclude_site)
            if code is not None:
                mask &= self.codes["site"][:n] != code
        return mask

    def distinct(self, key: str, mask: np.ndarray) -> dict[str, int]:
        """``{value: count}`` of ``key`` over the rows in ``mask``."""
        rows = np.flatnonzero(mask)
        inv = {c: v for v, c in self.vocab[key].items()}
        codes, counts = np.unique(self.codes[key][rows], return_counts=True)
        return {inv[int(c)]: int(n) for c, n in zip(codes, counts, strict=True)}

    def shortfall(self, k: int, n_elig: int, filters: dict[str, str | None]) -> str:
        """Why only ``n_elig`` < k rows match ``filters``: the message of ``NotEnoughRecordsError``."""
        filt = ", ".join(f"{n}={v!r}" for n, v in filters.items() if v is not None)
        absent = []
        for key in ("task", "modality", "base"):
            value = filters.get(key)
            present = self.distinct(key, self.mask()) if value is not None else {}
            if value is not None and value not in present:
                absent.append(f"no record has {key}={value!r} ({key}s present: {', '.join(sorted(present)) or 'none'})")
        return (f"asked for k={k} nearest adapters but only {n_elig} record(s) match"
                + (f" ({filt})" if filt else "") + "; " + "; ".join(absent + ["lower k or widen the filters"]))

    def rows_view(self, rows: np.ndarray) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """(ids, z, index metadata) of ``rows``: what the Chroma mirror stores."""
        return [self.ids[r] for r in rows], self.Z[rows], [self.index_metadata(int(r)) for r in rows]

    def index_metadata(self, row: int) -> dict[str, Any]:
        """The flat metadata the Chroma mirror stores next to a row's vector (for ``where`` filters)."""
        meta = self.meta[row]
        return {"site": meta["site"], "task": meta["task"], "modality": meta["modality"],
                "base": meta["base_fingerprint"], "sample_count": int(meta["sample_count"]),
                "rank": int(meta["rank"]), "blob_sha256": self.blob[row][0], "created_at": meta["created_at"]}
