"""The site's egress log: one JSON line for every reply that leaves the hospital.

Why: a hospital's privacy officer must be able to see, without trusting the coordinator, what
data left the site — which arrays (shapes, sizes, hashes), which configuration and metric
values — and later prove that the coordinator's audit log describes the same messages
(``server/crosscheck.py`` matches the two). Array *contents* are never logged, only their
hashes; the log itself is therefore safe to share with the coordinator's operators.

The line format and the reader are in ``common/protocol/egress.py`` (both sides need them); this module
is the writer, on ``common.files.durable.JsonlLog`` (flock, fsync, a failed append truncated back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.files.durable import JsonlLog
from common.protocol.egress import DEFAULT_FULL_RECORDS, EGRESS_FORMAT_VERSION, describe_record
from common.trust.digests import canonical_json

__all__ = ["EgressLog"]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EgressLog:
    """Append-only JSON-lines log of outgoing replies at ``path`` (created if missing).

    Appends hold an exclusive ``flock`` (Flower may run ClientApps in several processes) and are
    fsynced, so a reply is never sent without its line being on disk when ``record`` is called
    before the reply is returned.
    """

    def __init__(self, path: str | os.PathLike[str], full_records: Iterable[str] = DEFAULT_FULL_RECORDS) -> None:
        self.path = Path(path)
        self.full_records = frozenset(full_records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = JsonlLog(self.path, create=False)

    def record(
        self,
        message_type: str,
        records: Mapping[str, Mapping[str, Any]],
        run_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        kinds: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Log one outgoing reply and return the line written (as a dict).

        ``records``: {record name: record} where a record is a Flower ArrayRecord /
        ConfigRecord / MetricRecord or a plain dict of arrays or of scalars. ``kinds`` overrides
        the inferred kind per record name (it is only a label; digests do not depend on it).
        ``extra``: small JSON-able context worth keeping next to the reply, e.g. ``blob_sha256``,
        ``z_sha256``, ``nonce``, ``signature`` (the cross-check falls back to blob/z hashes here
        when the coordinator logged no record digests).
        """
        if not isinstance(message_type, str) or not message_type:
            raise ValueError(f"message_type must be a non-empty string; got {message_type!r}")
        if not isinstance(records, Mapping):
            raise TypeError(f"records must be a mapping of name -> record; got {type(records).__name__}")
        kinds = dict(kinds or {})
        described = [
            describe_record(name, rec, kinds.get(name), full=name in self.full_records) for name, rec in records.items()
        ]
        line = {
            "v": EGRESS_FORMAT_VERSION,
            "ts": _now(),
            "message_type": message_type,
            "run_id": run_id,
            "records": described,
            "total_bytes": sum(r["bytes"] for r in described),
            "extra": dict(extra) if extra is not None else None,
        }
        try:
            text = canonical_json(line)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"egress extra must be JSON-serialisable without NaN/inf: {exc}") from exc
        if not self.path.exists():
            JsonlLog(self.path)  # create it durably (the file and its directory entry)
        with self._log.locked() as fh:
            self._repair_tail(fh)
            self._log.append([text.encode("ascii")], fh=fh)
        return json.loads(text)

    def _repair_tail(self, fh: Any) -> None:
        """Under the append lock: a log that ends mid-line (a crash during an append, so that reply
        never left) would get the next line glued onto the fragment, and every later budget check
        and ``rpe privacy spent`` would fail on it. The fragment is moved aside, durably, to
        ``egress.jsonl.torn-<offset>``, the log cut back to its last whole line, and the repair
        recorded in ``egress.repairs.jsonl`` next to it (and the SuperNode's log)."""
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos = size
        while pos > 0:  # the start of the torn line: just after the last newline
            step = min(8192, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                pos = pos - step + cut + 1
                break
            pos -= step
        fh.seek(pos)
        fragment = fh.read(size - pos)
        aside = self.path.with_name(f"{self.path.name}.torn-{pos}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, fragment)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._log.repair(pos, fh)
        note = {
            "ts": _now(),
            "event": "egress.torn-tail-repaired",
            "offset": pos,
            "bytes": len(fragment),
            "kept_at": aside.name,
        }
        JsonlLog(self.path.with_name(f"{self.path.stem}.repairs.jsonl")).append([canonical_json(note)])
        print(
            f"egress log {self.path}: a torn last line ({len(fragment)} bytes at offset {pos}, an append "
            f"interrupted before its reply left) was moved to {aside.name}; the log continues",
            flush=True,
        )
