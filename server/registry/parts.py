"""The parts a ``Registry`` is a facade over, as one value: what ``loading.open_parts`` assembles
and passes to the facade, and what ``maintenance`` works on. Nothing here imports the facade, so
the facade, the assembly and the maintenance operations depend on this module and not on each
other.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from server.audit import AuditLog
from server.registry import snapshot
from server.registry.blobstore import BlobStore
from server.registry.chroma_index import ChromaIndex
from server.registry.columns import Columns, MemColumn
from server.registry.lock import PathLock
from server.registry.recordlog import RecordLog
from server.registry.search import Searcher
from server.registry.writer import Writer
from server.zindex import ZColumn

log = logging.getLogger("server.registry.facade")


@dataclass
class Parts:
    """An open registry directory's components, each with one job (``__init__.py`` lists them).

    ``lock`` is None for a read-only open (no writer lock; ``mutex`` is then a private RLock);
    ``index`` is None when Chroma is off or the open is read-only.
    """

    path: Path
    read_only: bool
    lock: PathLock | None
    mutex: threading.RLock
    blobs: BlobStore
    audit: AuditLog
    zcol: ZColumn | MemColumn
    cols: Columns
    log: RecordLog
    search: Searcher
    writer: Writer
    index: ChromaIndex | None

    def fresh(self) -> Columns:
        """The columns, after picking up lines another writer object appended (caller holds the mutex)."""
        self.log.refresh()
        return self.cols

    def close(self) -> None:
        """Persist the caches (search state, columns snapshot), close the column, Chroma and the lock."""
        if not self.read_only:
            try:
                self.search.save_state()
            except OSError as exc:  # a cache: losing it costs a rebuild on the next query, not data
                log.warning("could not persist the search index of %s (%s)", self.path, exc)
            if isinstance(self.zcol, ZColumn):
                try:
                    snapshot.write(self.path / snapshot.SNAP_NAME, self.cols, self.log, self.audit)
                except OSError as exc:  # a cache: losing it costs a full replay on the next open, not data
                    log.warning("could not write the columns snapshot of %s (%s)", self.path, exc)
        with contextlib.suppress(Exception):
            self.zcol.close()
        if self.index is not None:
            with contextlib.suppress(Exception):
                self.index.disconnect()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
