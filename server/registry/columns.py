"""The registry's in-memory columns: metadata as integer codes, z as rows of the z column file.

Why columns: a query must filter by task/modality/base/site and rank thousands of z without
building a Python object per record, so each record is a *row*: ``live[row]``, one int32 code per
filterable field, the stored metadata, and ``zrow[row]``, the row of its z in the memory-mapped
``ZColumn`` (``server/zindex/column.py``: nothing is parsed or copied on open). Rows are appended
as records.jsonl is replayed and reused when a removed id is added again (its new z is a new
column row: the column is append-only). ``Z`` / ``n2`` (z and its squared norm by record row)
are derived on demand for the legacy search paths. Masks (``mask``) and counts (``distinct``) are
numpy operations over the codes. A z handed out (``record``, ``z_rows``) is checked against the
record's ``z_sha256`` first, so a column edited outside the registry is caught when it is used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from server.registry.errors import RecordNotFoundError, RegistryCorruptError
from server.registry.records import AdapterMeta, Record

_loads: Callable[[bytes | str], Any]
try:  # chromadb depends on orjson (as in recordlog.py); json reads the same lines
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

#: filterable key -> metadata field
KEYS = {"site": "site", "task": "task", "modality": "modality", "base": "base_fingerprint"}


class ZSource(Protocol):
    """What the columns need of a z store (``ZColumn``, or ``MemColumn`` for an old-format registry
    opened read-only)."""

    dim: int

    def __len__(self) -> int: ...

    def matrix(self) -> np.ndarray: ...

    def append(self, block: np.ndarray) -> range: ...

    def refresh(self) -> int: ...


class MemColumn:
    """An in-memory, append-only z store with ``ZColumn``'s reading interface: holds the z of a
    registry whose records.jsonl still carries z as base64 (format before the column file), while
    it is read (read-only) or migrated."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._Z = np.zeros((0, dim), dtype=np.float32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def matrix(self) -> np.ndarray:
        """The (count, dim) float32 rows (a view)."""
        return self._Z[: self._n]

    def append(self, block: np.ndarray) -> range:
        """Append rows; returns their indices."""
        arr = np.asarray(block, dtype=np.float32).reshape(-1, self.dim)
        need = self._n + arr.shape[0]
        if need > self._Z.shape[0]:
            Z = np.zeros((max(need, 2 * self._Z.shape[0], 64), self.dim), dtype=np.float32)
            Z[: self._n] = self._Z[: self._n]
            self._Z = Z
        self._Z[self._n : need] = arr
        start, self._n = self._n, need
        return range(start, need)

    def refresh(self) -> int:
        """Nothing to re-read (in memory)."""
        return self._n

    def close(self) -> None:
        """Nothing to release."""


_LAZY: Any = object()  # a row restored from the columns snapshot whose line is not parsed yet


class LazyRows(list):
    """``Columns.meta`` / ``.blob``: a list whose snapshot-restored entries are read from their
    records.jsonl line on first use (``fill(row)`` sets both lists' entries)."""

    __slots__ = ("fill",)

    def __init__(self, items: Any = (), fill: Callable[[int], None] | None = None) -> None:
        super().__init__(items)
        self.fill = fill

    def __getitem__(self, i: Any) -> Any:
        v = list.__getitem__(self, i)
        if v is _LAZY:
            assert self.fill is not None
            self.fill(int(i))
            v = list.__getitem__(self, i)
        elif isinstance(i, slice) and any(x is _LAZY for x in v):
            return [self[j] for j in range(*i.indices(len(self)))]
        return v

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))


class Columns:
    """Rows of records for an embedding dimension ``dim``; ``source`` names the log in errors.

    ``on_rows(rows)`` (optional) is told which rows got a new z, e.g. to keep a projection current.
    ``zcol`` is the z store whose rows ``zrow`` points into.
    """

    def __init__(self, dim: int, source: str, zcol: ZSource | None = None) -> None:
        self.dim = dim
        self.source = source
        self.zcol: ZSource = zcol if zcol is not None else MemColumn(dim)
        self.n = 0
        self.n_live = 0
        self.version = 0  # bumped whenever a row gets a new z (invalidates the derived Z / n2)
        self._derived: dict[str, Any] = {}
        self.zrow = np.zeros(0, dtype=np.int64)
        self.live = np.zeros(0, dtype=bool)
        self.codes: dict[str, np.ndarray] = {k: np.zeros(0, dtype=np.int32) for k in KEYS}
        self.vocab: dict[str, dict[str, int]] = {k: {} for k in KEYS}
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.meta: list[dict[str, Any]] = LazyRows()
        self.blob: list[tuple[str, int, str]] = LazyRows()  # (sha, bytes, z_sha)
        self.on_rows: Callable[[np.ndarray], None] | None = None
        #: records.jsonl offset of each row's current add line (-1: not known; for the snapshot)
        self.line_off = np.zeros(0, dtype=np.int64)
        self._read_line: Callable[[int], bytes] = lambda off: b""

    def restore(
        self,
        ids: list[str],
        zrow: np.ndarray,
        live: np.ndarray,
        codes: dict[str, np.ndarray],
        vocab: dict[str, dict[str, int]],
        line_off: np.ndarray,
        read_line: Callable[[int], bytes],
    ) -> None:
        """Take the state a replay of records.jsonl up to a snapshot's end would build (an empty
        ``Columns`` only; ``server.registry.snapshot``). Each row's metadata and blob fields are
        read from its add line (``read_line(offset)``) on first use, and the line must name the row's id."""
        n = len(ids)
        self.ensure_capacity(n)
        self.ids = ids
        self.row = dict(zip(ids, range(n), strict=True))
        self.zrow[:n], self.live[:n] = zrow, live
        for k in KEYS:
            self.codes[k][:n] = codes[k]
        self.vocab = vocab
        self.n, self.n_live = n, int(np.count_nonzero(live))
        self.line_off[:n] = line_off
        self._read_line = read_line
        self.meta = LazyRows([_LAZY] * n, self._fill)
        self.blob = LazyRows([_LAZY] * n, self._fill)
        self.version += 1

    def _fill(self, row: int) -> None:
        off = int(self.line_off[row])
        try:
            e = _loads(self._read_line(off))
            ok = e["op"] == "add" and e["id"] == self.ids[row]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise RegistryCorruptError(
                f"{self.source}: the line at byte {off} is not the add line of record {self.ids[row]}, as the "
                "columns snapshot says: delete columns.snap (a cache) and reopen the registry"
            )
        list.__setitem__(self.meta, row, e["meta"])
        list.__setitem__(self.blob, row, (e["blob_sha256"], int(e["bytes"]), e["z_sha256"]))

    def ensure_capacity(self, extra: int) -> None:
        """Room for ``extra`` more rows (capacity doubles, so appends stay amortised O(1))."""
        need = self.n + extra
        cap = self.live.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2, 64)

        def grow(a: np.ndarray) -> np.ndarray:
            out = np.zeros((new_cap,) + a.shape[1:], dtype=a.dtype)
            out[: self.n] = a[: self.n]
            return out

        self.zrow = grow(self.zrow)
        self.live = grow(self.live)
        self.line_off = grow(self.line_off)
        for k in self.codes:
            self.codes[k] = grow(self.codes[k])

    def _code(self, key: str, value: str) -> int:
        vocab = self.vocab[key]
        c = vocab.get(value)
        if c is None:
            c = vocab[value] = len(vocab)
        return c

    def append_z(self, Z: np.ndarray) -> np.ndarray:
        """Append z rows to the column (durably, for a ``ZColumn``); returns their column rows."""
        r = self.zcol.append(np.ascontiguousarray(Z, dtype=np.float32).reshape(-1, self.dim))
        return np.arange(r.start, r.stop, dtype=np.int64)

    def apply_adds(
        self,
        items: Sequence[tuple[str, dict[str, Any], str, int, str]],
        zrows: Sequence[int] | np.ndarray,
        line_offs: Sequence[int] | np.ndarray | None = None,
    ) -> list[int]:
        """Put records ``(id, meta, blob sha, bytes, z sha)`` whose z are column rows ``zrows`` into
        rows (their add lines at records.jsonl offsets ``line_offs``, if known); returns the rows. A
        column row past the column's end is corruption (the column is written and fsynced before
        the record line that names it)."""
        zr_all = np.asarray(zrows, dtype=np.int64).reshape(-1)
        offs = (
            np.full(zr_all.size, -1, dtype=np.int64)
            if line_offs is None
            else np.asarray(line_offs, dtype=np.int64).reshape(-1)
        )
        if zr_all.size and int(zr_all.max()) >= len(self.zcol):
            self.zcol.refresh()  # another writer may have appended since we mapped it
            if int(zr_all.max()) >= len(self.zcol):
                raise RegistryCorruptError(
                    f"{self.source}: a record names z row {int(zr_all.max())} but the z column holds "
                    f"{len(self.zcol)} rows: the column file was truncated or replaced outside the registry; "
                    "restore it (z.f32 and z.f32.crc) from the backup taken with records.jsonl"
                )
        if zr_all.size and int(zr_all.min()) < 0:
            raise RegistryCorruptError(f"{self.source}: a record names a negative z row")
        self.ensure_capacity(len(items))
        new_ids = [it[0] for it in items]
        if len(set(new_ids)) == len(new_ids) and not any(rid in self.row for rid in new_ids):
            return self._append_new(items, zr_all, offs)  # the replay's common case, without a per-row loop
        rows: list[int] = []
        for (rid, meta, sha, nbytes, zsha), zr, off in zip(items, zr_all, offs, strict=True):
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
            self.zrow[row] = zr
            self.line_off[row] = off
            self.live[row] = True
            self.n_live += 1
            for key, mkey in KEYS.items():
                self.codes[key][row] = self._code(key, meta[mkey])
            rows.append(row)
        if rows:
            self.version += 1
            if self.on_rows is not None:
                self.on_rows(np.asarray(rows))
        return rows

    def _append_new(
        self, items: Sequence[tuple[str, dict[str, Any], str, int, str]], zr: np.ndarray, offs: np.ndarray
    ) -> list[int]:
        """``apply_adds`` for ids not seen before: rows appended in bulk (opening a large registry)."""
        m, start = len(items), self.n
        if len(zr) != m:
            raise RegistryCorruptError(f"{self.source}: {m} records but {len(zr)} z rows")
        rows = range(start, start + m)
        self.ids.extend(it[0] for it in items)
        self.meta.extend(it[1] for it in items)
        self.blob.extend((it[2], it[3], it[4]) for it in items)
        self.row.update(zip(self.ids[start:], rows, strict=True))
        self.zrow[start : start + m] = zr
        self.line_off[start : start + m] = offs
        self.live[start : start + m] = True
        for key, mkey in KEYS.items():
            vocab = self.vocab[key]
            codes = []
            for it in items:
                value = it[1][mkey]
                c = vocab.get(value)
                if c is None:
                    c = vocab[value] = len(vocab)
                codes.append(c)
            self.codes[key][start : start + m] = codes
        self.n += m
        self.n_live += m
        self.version += 1
        out = list(rows)
        if self.on_rows is not None:
            self.on_rows(np.asarray(out))
        return out

    # ---- z by record row (derived, cached per version) ----------------------------------------

    def _cached(self, name: str, make: Callable[[], Any]) -> Any:
        key = (self.version, self.n, len(self.zcol))
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            hit = self._derived[name] = (key, make())
        return hit[1]

    @property
    def Z(self) -> np.ndarray:  # noqa: N802 - the matrix's conventional name
        """z of every record row (n × dim float32): a view of the column when the rows are
        contiguous there (the usual case), else a gathered copy (after re-adds or a crash's orphan
        rows). Not verified: for the search paths, which verify what they return."""

        def make() -> np.ndarray:
            zr = self.zrow[: self.n]
            M = self.zcol.matrix()
            if self.n and int(zr[-1]) - int(zr[0]) == self.n - 1 and bool(np.all(np.diff(zr) == 1)):
                return M[int(zr[0]) : int(zr[0]) + self.n]
            return M[zr] if self.n else np.zeros((0, self.dim), dtype=np.float32)

        return self._cached("Z", make)

    @property
    def n2(self) -> np.ndarray:
        """Squared norms (float32 sums, as float64) of ``Z``'s rows; their error is in search's bound."""

        def make() -> np.ndarray:
            Z = self.Z
            out = np.empty(self.n, dtype=np.float64)
            step = max(1, (1 << 22) // self.dim)
            for s in range(0, self.n, step):
                out[s : s + step] = np.einsum("ij,ij->i", Z[s : s + step], Z[s : s + step])
            return out

        return self._cached("n2", make)

    def z_of_zrows(self) -> np.ndarray:
        """``inv[column row] = record row`` for the rows holding a record's current z, else −1."""

        def make() -> np.ndarray:
            inv = np.full(len(self.zcol), -1, dtype=np.int64)
            inv[self.zrow[: self.n]] = np.arange(self.n)
            return inv

        return self._cached("inv", make)

    def zrow_monotone(self) -> bool:
        """True when record rows and their column rows are in the same order (ties agree)."""
        return bool(self._cached("mono", lambda: bool(np.all(np.diff(self.zrow[: self.n]) > 0))))

    def z_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """A verified copy of the z of record ``rows``: each checked against its ``z_sha256``."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        Z = np.array(self.zcol.matrix()[self.zrow[r]], dtype="<f4")
        for i, row in enumerate(r):
            if hashlib.sha256(Z[i].tobytes()).hexdigest() != self.blob[int(row)][2]:
                raise RegistryCorruptError(
                    f"{self.source}: the z of record {self.ids[int(row)]} (z column row {int(self.zrow[row])}) no "
                    "longer matches its z_sha256: the z column was modified outside the registry; restore "
                    "z.f32 from a backup (`Registry.verify(full=True)` lists every damaged record)"
                )
        return Z

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
        return Record(self.ids[row], self.z_rows([row])[0], AdapterMeta(**meta), sha, nbytes, zsha)

    def live_rows(self) -> np.ndarray:
        """Rows of live records, in insertion order."""
        return np.flatnonzero(self.live[: self.n])

    def mask(
        self,
        task: str | None = None,
        modality: str | None = None,
        base: str | None = None,
        site: str | None = None,
        exclude_site: str | None = None,
    ) -> np.ndarray:
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
        return (
            f"asked for k={k} nearest adapters but only {n_elig} record(s) match"
            + (f" ({filt})" if filt else "")
            + "; "
            + "; ".join(absent + ["lower k or widen the filters"])
        )

    def rows_view(self, rows: np.ndarray) -> tuple[list[str], np.ndarray, list[dict[str, Any]]]:
        """(ids, z, index metadata) of ``rows``: what the Chroma mirror stores."""
        return [self.ids[r] for r in rows], self.z_rows(rows), [self.index_metadata(int(r)) for r in rows]

    def index_metadata(self, row: int) -> dict[str, Any]:
        """The flat metadata the Chroma mirror stores next to a row's vector (for ``where`` filters)."""
        meta = self.meta[row]
        return {
            "site": meta["site"],
            "task": meta["task"],
            "modality": meta["modality"],
            "base": meta["base_fingerprint"],
            "sample_count": int(meta["sample_count"]),
            "rank": int(meta["rank"]),
            "blob_sha256": self.blob[row][0],
            "created_at": meta["created_at"],
        }
