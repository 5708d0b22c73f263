"""The Chroma mirror of the live records: an approximate (HNSW) index that is only ever a cache.

Chroma 1.5.9 is not crash-safe and is approximate (``shared/FACTS.md``), so the registry never
depends on it for correctness: on open the collection is reconciled with the records (missing ids
upserted, extra ids deleted, a sample of vectors compared, a probe query run), and anything odd
means a rebuild from the records. Every failure here is logged and turns the index off for
queries (``fresh = False``); the records stay the source of truth. Only Chroma's public client
API is used (``PersistentClient`` / ``HttpClient``, ``close``, collection calls), except
where a rebuild must drop the System a failed client left cached (``_drop_cached_system``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.registry.columns import Columns
from server.registry.errors import RegistryError

log = logging.getLogger(__name__)

HNSW_CONFIG = {"space": "l2", "max_neighbors": 48, "ef_construction": 400, "ef_search": 200}
CHROMA_BATCH = 5000  # Chroma's max batch is 5461

#: rows -> (ids, float32 vectors, flat metadata) of those rows, from the columns
RowsView = Callable[[np.ndarray], tuple[list[str], np.ndarray, list[dict[str, Any]]]]


class ChromaIndex:
    """Collection ``spec["collection"]`` (embedded under ``chroma_dir``, or on a ``chroma run``
    server) owned by registry ``registry_id``. ``fresh``: it holds exactly the live records."""

    def __init__(self, spec: dict[str, Any], chroma_dir: Path, registry_id: str, dim: int) -> None:
        self.spec = spec
        self.chroma_dir = chroma_dir
        self.registry_id = registry_id
        self.dim = dim
        self.client: Any = None
        self.collection: Any = None
        self.fresh = False
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        """True when queries may take candidates from the index."""
        return self.collection is not None and self.fresh

    def _client(self) -> Any:
        import chromadb  # lazy: seconds to import; read-only opens and chroma="off" never connect
        from chromadb.config import Settings  # lazy: as chromadb

        settings = Settings(anonymized_telemetry=False)
        if self.spec["mode"] == "http":
            return chromadb.HttpClient(host=self.spec["host"], port=self.spec["port"], settings=settings)
        return chromadb.PersistentClient(path=str(self.chroma_dir), settings=settings)

    def _check_owner(self, col: Any) -> None:
        owner = (col.metadata or {}).get("rpe_registry")
        if owner not in (None, self.registry_id):
            raise RegistryError(
                f"Chroma collection {self.spec['collection']!r} belongs to another registry ({owner}); configure "
                "a different collection name for this registry"
            )

    def connect(self) -> None:
        """Open (or create) the collection; ``RegistryError`` if another registry owns it."""
        self.client = self._client()
        col = self.client.get_or_create_collection(
            self.spec["collection"],
            embedding_function=None,
            configuration={"hnsw": dict(HNSW_CONFIG)},
            metadata={"rpe_registry": self.registry_id, "dim": self.dim},
        )
        self._check_owner(col)
        self.collection = col

    def disconnect(self) -> None:
        """Close the client (the last close of an embedded client releases Chroma's files)."""
        client, self.client, self.collection = self.client, None, None
        if client is not None and hasattr(client, "close"):
            with contextlib.suppress(Exception):
                client.close()

    def _drop_cached_system(self) -> None:
        """Forget Chroma's in-process System for our directory, so the next client opens fresh files.

        ``client.close()`` (public) releases it when our client was the last user, but a client
        whose constructor failed on corrupt files leaves the System cached, and a new client would
        reuse its broken state. Chroma has no public per-path release (``clear_system_cache``
        drops every registry's System), so this one step uses its class tables, by identifier.
        """
        from chromadb.api.shared_system_client import SharedSystemClient  # lazy: as chromadb

        key = str(self.chroma_dir)
        system = SharedSystemClient._identifier_to_system.pop(key, None)
        SharedSystemClient._identifier_to_refcount.pop(key, None)
        if system is not None:
            with contextlib.suppress(Exception):
                system.stop()

    # ---- writes (each failure only makes the index stale) -----------------------------------

    def upsert(self, rows: Sequence[int], view: RowsView) -> None:
        """Upsert rows in batches of ≤ 5000; a failure is logged and marks the index stale."""
        if self.collection is None:
            return
        try:
            self._upsert(rows, view)
        except Exception as exc:  # noqa: BLE001 - the record is durable; the index is a cache
            log.warning("Chroma upsert failed (%s); queries stay exact, index will be reconciled", exc)
            self.fresh = False

    def _upsert(self, rows: Sequence[int], view: RowsView) -> None:
        for s in range(0, len(rows), CHROMA_BATCH):
            ids, emb, metas = view(np.asarray(rows[s : s + CHROMA_BATCH], dtype=np.int64))
            self.collection.upsert(ids=ids, embeddings=emb, metadatas=metas)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete ids; a failure is logged and marks the index stale (the tombstone is durable)."""
        if self.collection is None:
            return
        try:
            self.collection.delete(ids=list(ids))
        except Exception as exc:  # noqa: BLE001
            log.warning("Chroma delete failed (%s); index will be reconciled", exc)
            self.fresh = False

    # ---- reads ------------------------------------------------------------------------------

    def candidates(self, q: np.ndarray, want: int, where: dict[str, Any] | None) -> list[str]:
        """Up to ``want`` approximate neighbour ids of ``q`` ([] when not ready or on failure)."""
        if not self.ready or want < 1:
            return []
        try:
            res = self.collection.query(query_embeddings=[q], n_results=want, where=where, include=["distances"])
            return list(res["ids"][0])
        except Exception as exc:  # noqa: BLE001 - the index is only an accelerator
            log.warning("Chroma query failed (%s); using the exact fallback", exc)
            return []

    def count(self) -> int:
        """Vectors in the collection."""
        return int(self.collection.count())

    def problems(self, n_live: int) -> list[str]:
        """What ``Registry.verify`` reports about the index: a count that differs, or an unreadable one."""
        if self.collection is None:
            return []
        try:
            count = self.count()
        except Exception as exc:  # noqa: BLE001
            return [f"Chroma unreadable: {exc}"]
        return [] if count == n_live else [f"Chroma holds {count} vectors, records {n_live}"]

    def _all_ids(self) -> set[str]:
        out: set[str] = set()
        offset, page = 0, 20_000
        while True:
            got = self.collection.get(include=[], limit=page, offset=offset)["ids"]
            out.update(got)
            if len(got) < page:
                return out
            offset += page

    # ---- reconcile / rebuild ----------------------------------------------------------------

    def reconcile(
        self, live: np.ndarray, ids: Sequence[str], row_of: dict[str, int], Z: np.ndarray, view: RowsView
    ) -> tuple[bool, str]:
        """Make the collection hold exactly the live rows; (False, why) if it must be rebuilt."""
        live_ids = {ids[r] for r in live}
        have = self._all_ids()
        extra = sorted(have - live_ids)
        missing = sorted(live_ids - have)
        if len(extra) + len(missing) > max(1000, len(live_ids) // 2):
            return False, f"{len(missing)} missing / {len(extra)} extra ids"
        for s in range(0, len(extra), CHROMA_BATCH):
            self.collection.delete(ids=extra[s : s + CHROMA_BATCH])
        if missing:
            self._upsert([row_of[i] for i in missing], view)
        count = self.count()
        if count != len(live_ids):
            return False, f"count {count} != {len(live_ids)} records"
        if live.size:
            sample = np.random.default_rng().choice(live, min(16, live.size), replace=False)
            got = self.collection.get(ids=[ids[r] for r in sample], include=["embeddings"])
            by_id = dict(zip(got["ids"], got["embeddings"], strict=True))
            for r in sample:
                emb = by_id.get(ids[r])
                if emb is None or not np.array_equal(np.asarray(emb, dtype=np.float32), Z[r]):
                    return False, f"stored vector of {ids[r]} differs from the records"
            res = self.collection.query(
                query_embeddings=[Z[sample[0]]], n_results=min(4, live.size), include=["distances"]
            )
            if not res["ids"] or not res["ids"][0]:
                return False, "probe query returned nothing"
        if extra or missing:
            log.info("Chroma reconciled (%d upserted, %d deleted)", len(missing), len(extra))
        return True, ""

    def sync(self, cols: Columns, rebuild: bool = False) -> str | None:
        """Reconcile with the live rows of ``cols``, rebuilding if that fails (or ``rebuild``).

        Returns why it was rebuilt (the ``registry.reindex`` audit reason), or None when the
        collection was fine or could not be rebuilt (then ``error`` says why; queries stay exact)."""
        live, reason = cols.live_rows(), "requested"
        if not rebuild:
            try:
                if self.collection is None:
                    self.connect()
                ok, reason = self.reconcile(live, cols.ids, cols.row, cols.Z, cols.rows_view)
            except RegistryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any Chroma failure means: rebuild
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            if ok:
                self.fresh = True
                return None
        log.warning("rebuilding the Chroma index %s from the records (%s)", self.spec["collection"], reason)
        try:
            self.rebuild(live, cols.rows_view)
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001 - queries stay exact without the index
            self.fresh, self.error = False, f"{type(exc).__name__}: {exc}"
            log.warning("Chroma index unavailable (%s); queries use numpy only", self.error)
            return None
        return reason

    def rebuild(self, live: np.ndarray, view: RowsView) -> None:
        """Drop the collection (embedded: its whole directory) and fill it again from the live rows."""
        self.disconnect()
        if self.spec["mode"] == "embedded":
            self._drop_cached_system()
            shutil.rmtree(self.chroma_dir, ignore_errors=True)
        else:
            client = self._client()
            try:
                self._check_owner(client.get_collection(self.spec["collection"]))
                client.delete_collection(self.spec["collection"])
            except RegistryError:
                raise
            except Exception:  # noqa: BLE001 - absent collection
                pass
        self.connect()
        self.fresh = True
        self.upsert(live.tolist(), view)
