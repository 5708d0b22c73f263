"""The site's release history: no two releases may differ by fewer items than the site's minimum set.

Why (issue 26 class 2, "differencing over time"): a z is released only over a whole set of at least
``z-min-examples`` items, and metrics only over at least ``metrics-min-reports``; but a coordinator
that asks again after the data changed gets two releases whose *difference* covers one item:
``z₂·T₂ − z₁·T₁`` was one added report's exact token sum, ``n₂m₂ − n₁m₁`` its exact ROUGE-L, and an
enrolment z (training reports) minus a query z (every report) the held-out set. So the site keeps,
locally and durably (``<site-dir>/privacy/releases.jsonl``: flock, fsync, a torn tail cut), the set
of items every release covered (one digest per item, never the item), and before a new release over
set S it compares S with every earlier release P of the same kind and scope:

* S == P: the same set again (nothing new is learnt; a noisy z is re-sent from the cache);
* 0 < |S △ P| < minimum: the difference would isolate fewer items than the policy allows. A z is
  then answered **from the earlier release** (the same z and the same rounded counts, so nothing new
  leaves: the z of P is kept here, it already left); metrics are withheld (they depend on the
  adapters scored, so no earlier answer fits);
* otherwise the release goes ahead and is recorded *before* it is sent (a release that then fails
  to leave only makes the history stricter, never looser).

Counts leave rounded down to a multiple of the minimum set size (``round_count``): the coordinator
stores and shows ``sample_count`` and uses no count to compute anything; ``token_count`` is not
needed by anyone but the site and leaves as 0.

Not covered (said in docs/THREAT_MODEL.md): with many releases a coordinator could combine more
than two (S₃ − S₂ + S₁ − …); the rule bounds each pairwise difference only. A Gaussian mechanism
(``z-noise-multiplier``) is what bounds every combination.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.files.durable import JsonlLog

HISTORY_FILE = "releases.jsonl"
HISTORY_VERSION = 1
#: the largest history read (a site's releases are a few per run; the items' digests are 16 bytes each)
MAX_HISTORY_BYTES = 512 << 20


class HistoryError(RuntimeError):
    """The release history cannot be read: nothing is released until it is repaired (fail closed)."""


def round_count(n: int, minimum: int) -> int:
    """``n`` rounded down to a multiple of ``minimum`` (never below ``minimum``, never below 1)."""
    m = max(1, int(minimum))
    return max(m, int(n) - int(n) % m)


def item_digest(item: Any) -> str:
    """A digest of one item by its content (arrays by dtype, shape and bytes; dataclasses and
    sequences by their parts), for items of any family."""
    h = hashlib.sha256()
    _feed(h, item)
    return h.hexdigest()[:32]


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, np.ndarray):
        h.update(f"nd{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif is_dataclass(x) and not isinstance(x, type):
        h.update(f"dc{type(x).__name__}".encode())
        for f in fields(x):
            h.update(f.name.encode())
            _feed(h, getattr(x, f.name))
    elif isinstance(x, (list, tuple)):
        h.update(f"seq{len(x)}".encode())
        for part in x:
            _feed(h, part)
    elif isinstance(x, dict):
        h.update(f"map{len(x)}".encode())
        for k in sorted(x, key=str):
            _feed(h, str(k))
            _feed(h, x[k])
    elif isinstance(x, bytes):
        h.update(b"b" + len(x).to_bytes(8, "big") + x)
    else:
        text = repr(x).encode()
        h.update(b"r" + len(text).to_bytes(8, "big") + text)


class ReleaseHistory:
    """``<site-dir>/privacy/releases.jsonl``: one line per distinct release (kind, scope, items)."""

    def __init__(self, site_dir: Path) -> None:
        self.path = Path(site_dir) / "privacy" / HISTORY_FILE
        self._log = JsonlLog(self.path)

    def entries(self) -> list[dict[str, Any]]:
        """Every recorded release; a damaged line (other than a torn last one) is a ``HistoryError``."""
        from common.files.safeio import UnsafeInputError, loads_json, read_regular_file

        try:
            data = read_regular_file(self.path, MAX_HISTORY_BYTES, "release history")
        except UnsafeInputError as exc:
            raise HistoryError(f"{exc}; nothing is released until the history can be read") from None
        lines = data.split(b"\n")
        whole = lines[:-1]  # the part after the last newline is a torn append (its release never left)
        out = []
        for i, raw in enumerate(whole, start=1):
            if not raw.strip():
                continue
            try:
                entry = loads_json(raw, f"release history {self.path} line {i}")
            except UnsafeInputError as exc:
                raise HistoryError(f"{exc}; nothing is released until the line is repaired") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("items"), list):
                raise HistoryError(f"release history {self.path} line {i} is not a release entry")
            out.append(entry)
        return out

    def check(self, kind: str, scope: str, items: Sequence[str], minimum: int) -> dict[str, Any] | None:
        """Before a release of ``kind`` (``z``, ``metrics``) in ``scope`` over ``items``: None when it
        may go ahead (and is then recorded, durably, before it is sent; an identical set is recorded
        once), else the earlier entry it differs from by fewer than ``minimum`` items (the caller
        answers from it or withholds)."""
        new = set(items)
        with self._log.locked() as fh:
            close: dict[str, Any] | None = None
            same = False
            for entry in self.entries():
                if entry.get("kind") != kind or entry.get("scope") != scope:
                    continue
                diff = len(new.symmetric_difference(entry["items"]))
                if diff == 0:
                    same = True
                elif diff < minimum:
                    close = entry  # the most recent such release
            if close is not None:
                if "answer" not in close:
                    close = {**close, "answer": self._answer_of(kind, scope, close["items"])}
                return close
            if not same:
                self._append(fh, {"kind": kind, "scope": scope, "n": len(new), "items": sorted(new)})
        return None

    def remember(self, kind: str, scope: str, items: Iterable[str], answer: dict[str, Any]) -> None:
        """Keep what a release sent (e.g. the z and its counts) with its entry, so that a later
        request too close to it can be answered with exactly the same values."""
        with self._log.locked() as fh:
            self._append(fh, {"kind": kind, "scope": scope, "items": sorted(set(items)), "answer": answer})

    def _answer_of(self, kind: str, scope: str, items: Sequence[str]) -> dict[str, Any] | None:
        """The values last sent for exactly this set (``remember``), if kept."""
        want = sorted(set(items))
        found = None
        for entry in self.entries():
            if entry.get("kind") == kind and entry.get("scope") == scope and "answer" in entry:
                if entry["items"] == want:
                    found = entry["answer"]
        return found

    def _append(self, fh: Any, entry: dict[str, Any]) -> None:
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":  # a torn tail: its release never left; cut it before appending
                fh.seek(0)
                data = fh.read()
                self._log.repair(data.rfind(b"\n") + 1, fh)
        line = json.dumps({"v": HISTORY_VERSION, **entry}, sort_keys=True, separators=(",", ":"))
        self._log.append([line], fh=fh)
