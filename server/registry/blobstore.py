"""Content-addressed adapter blobs, ``REG/blobs/sha256/ab/<hex>``, optionally AES-256-GCM encrypted.

A blob is named by the sha256 of the *plaintext* canonical adapter bytes and never rewritten. It
is written to a temp file in its final directory, fsynced, ``os.replace``-d into place and the
directory fsynced **before** the record that names it is appended, so a record never points at
a missing or half-written blob; a crash in between leaves at most an orphan, which ``gc``
removes. In an encrypted registry (``blob_encryption`` in registry.json) every blob is
ciphertext bound to its name (``server/registry/blobcrypt.py``); listing and queries never need
the key, storing and reading adapter bytes do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.files.durable import TMP_PREFIX, fsync_dir, fsync_file
from common.files.safeio import UnsafeInputError, read_regular_file
from common.trust.digests import sha256_hex
from server.registry import blobcrypt
from server.registry.blobcrypt import BlobKey
from server.registry.config import BLOBS_DIR, CONFIG_NAME
from server.registry.crashpoints import armed, crash_point
from server.registry.errors import BlobCorruptError, BlobKeyError, RegistryCorruptError

log = logging.getLogger(__name__)

#: no blob file is read past this size (the registry's own blob cap is far lower)
MAX_BLOB_FILE = 1 << 32


def env_blob_key() -> BlobKey | None:
    """The blob key from ``$RPE_BLOB_KEY_FILE`` / ``$RPE_BLOB_KEY`` (None if neither is set)."""
    try:
        return blobcrypt.load_blob_key()
    except blobcrypt.BlobKeyError as exc:
        raise BlobKeyError(str(exc)) from None


def _read_blob(p: Path) -> bytes:
    """A blob's bytes through ``common.files.safeio.read_regular_file``: a FIFO or device put in a blob's
    place is refused at once (``BlobCorruptError``) instead of blocking the coordinator forever."""
    try:
        return read_regular_file(p, MAX_BLOB_FILE, what="adapter blob")
    except UnsafeInputError as exc:
        if not p.exists() and not p.is_symlink():
            raise FileNotFoundError(str(p)) from None
        raise BlobCorruptError(
            f"{exc}; restore the blob from a backup, or remove the record and have the site resubmit"
        ) from None


def _parallel(fn: Callable[[Any], None], items: Sequence[Any]) -> None:
    """Run ``fn`` over ``items`` on a few threads (for fsync, which releases the GIL)."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(32, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass


class BlobStore:
    """The blob tree of the registry at ``root``; ``encryption`` is registry.json's ``blob_encryption``."""

    def __init__(self, root: Path, encryption: Any, key: BlobKey | None) -> None:
        self.root = root
        self.dir = root / BLOBS_DIR / "sha256"
        #: ``{"alg", "key_id"}`` when the registry's blobs are encrypted, else None
        self.encryption: dict[str, str] | None = None if encryption is None else dict(encryption)
        self.key: BlobKey | None = None
        key = key if key is not None else env_blob_key()
        if encryption is None:
            if key is not None:
                raise BlobKeyError(
                    f"registry {root} stores adapter blobs unencrypted, but a blob key was given ({key.source}); "
                    "refusing to ignore it. Create an encrypted registry with `rpe registry init --blob-key-file "
                    f"FILE` (Registry.init(..., blob_key=...)), or open this one without a key (unset "
                    f"${blobcrypt.KEY_FILE_ENV} / ${blobcrypt.KEY_ENV})"
                )
            return
        if (
            not isinstance(encryption, dict)
            or encryption.get("alg") != blobcrypt.ALG
            or not isinstance(encryption.get("key_id"), str)
        ):
            raise RegistryCorruptError(
                f"{root / CONFIG_NAME}: blob_encryption {encryption!r} is not {{'alg': {blobcrypt.ALG!r}, "
                "'key_id': ...}}; this version cannot read such blobs"
            )
        if key is not None and key.key_id != encryption["key_id"]:
            raise BlobKeyError(
                f"registry {root} blobs are encrypted with key {encryption['key_id']}, but the key from "
                f"{key.source} is key {key.key_id}; give the key file the registry was created with"
            )
        self.key = key

    # ---- the key ----------------------------------------------------------------------------

    @property
    def has_key(self) -> bool:
        """True when adapter bytes can be stored and read: blobs unencrypted, or the key is loaded."""
        return self.encryption is None or self.key is not None

    def require_key(self, what: str) -> BlobKey | None:
        """The key for an encrypted registry (None for a plain one); ``BlobKeyError`` if it is missing."""
        if self.encryption is None:
            return None
        if self.key is None:
            raise BlobKeyError(
                f"registry {self.root} stores adapter blobs encrypted ({self.encryption['alg']}, key "
                f"{self.encryption['key_id']}); {what} needs that key: set ${blobcrypt.KEY_FILE_ENV} to the "
                f"key file (or ${blobcrypt.KEY_ENV} to the key), pass --blob-key-file FILE to `rpe`, set run "
                "config blob-key-file, or open with Registry(path, blob_key=server.registry.blobcrypt."
                "load_blob_key(FILE)). Listing, queries and removal work without it"
            )
        return self.key

    def encryption_fields(self) -> dict[str, Any]:
        """``{"blob_encryption": {...}}`` for record lines and audit entries of an encrypted registry."""
        return {} if self.encryption is None else {"blob_encryption": dict(self.encryption)}

    # ---- reading ----------------------------------------------------------------------------

    def path(self, sha: str) -> Path:
        """Where the blob named ``sha`` lives."""
        return self.dir / sha[:2] / sha

    def stored_size(self, nbytes: int) -> int:
        """Size on disk of a blob of ``nbytes`` plaintext bytes."""
        return nbytes if self.encryption is None else blobcrypt.encrypted_size(nbytes)

    def plaintext(self, sha: str, data: bytes) -> bytes:
        """The adapter bytes of a stored blob (decrypted in an encrypted registry; raises
        ``blobcrypt.BlobKeyError`` / ``BlobAuthError``). The caller still checks the sha256."""
        key = self.require_key("reading adapter bytes")
        return data if key is None else blobcrypt.decrypt(key, data, sha)

    def is_intact(self, sha: str, nbytes: int) -> bool:
        """True if the blob exists, has the right size and (decrypted) hashes to its name."""
        p = self.path(sha)
        try:
            if p.stat().st_size != self.stored_size(nbytes):
                return False
            data = self.plaintext(sha, _read_blob(p))
        except (FileNotFoundError, blobcrypt.BlobAuthError):
            return False
        except BlobKeyError:
            raise
        except blobcrypt.BlobKeyError:  # encrypted with another key: rewrite it with ours
            return False
        return sha256_hex(data) == sha

    def load(self, sha: str, record_id: str) -> bytes:
        """The plaintext of blob ``sha`` (of record ``record_id``), re-verified against its name."""
        self.require_key(f"loading the adapter of record {record_id}")
        p = self.path(sha)
        try:
            data = self.plaintext(sha, _read_blob(p))
        except FileNotFoundError:
            raise BlobCorruptError(
                f"blob {sha} of record {record_id} is missing from {p.parent}; restore it from a backup "
                "or remove the record and have the site resubmit"
            ) from None
        except blobcrypt.BlobAuthError as exc:
            raise BlobCorruptError(
                f"blob of record {record_id} at {p}: {exc}; restore it from a backup or have the site resubmit"
            ) from None
        except BlobKeyError:
            raise
        except blobcrypt.BlobKeyError as exc:
            raise BlobKeyError(f"record {record_id} ({p}): {exc}") from None
        got = sha256_hex(data)
        if got != sha:
            raise BlobCorruptError(
                f"blob of record {record_id} at {p} hashes to {got}, not {sha}: the file was altered "
                "on disk; restore it from a backup or have the site resubmit"
            )
        return data

    def all(self) -> Iterator[Path]:
        """Every stored blob file (temp files excluded), in name order."""
        if not self.dir.is_dir():
            return
        for sub in sorted(self.dir.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if not p.name.startswith(TMP_PREFIX):
                        yield p

    # ---- writing ----------------------------------------------------------------------------

    def write(self, blobs: Mapping[str, bytes]) -> None:
        """Durably store new blobs: temp file in the final directory -> fsync -> os.replace ->
        fsync the directory, all before any record naming them is appended.

        The temp files of a batch are fsynced concurrently (fsync releases the GIL), so the
        filesystem journal commits them together instead of once per blob; on a busy disk that
        is the difference between ~6 ms and a fraction of a millisecond per adapter."""
        if not blobs:
            return
        key = self.require_key("storing adapters")
        pending: list[tuple[str, Path]] = []
        try:
            for sha, blob in blobs.items():
                if key is not None:
                    blob = blobcrypt.encrypt(key, blob, sha)
                final = self.path(sha)
                final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + sha[:12] + "-", dir=final.parent)
                pending.append((tmp, final))
                os.fchmod(fd, 0o400)  # blobs are never rewritten in place, and private
                with os.fdopen(fd, "wb") as fh:
                    half = len(blob) // 2
                    fh.write(blob[:half])
                    if armed():
                        fh.flush()
                        crash_point("mid_blob")
                    fh.write(blob[half:])
            _parallel(fsync_file, [tmp for tmp, _ in pending])
            crash_point("after_blob_tmp")
            for tmp, final in pending:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in pending:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        _parallel(fsync_dir, sorted({final.parent for _, final in pending}))

    def remove_stale_temps(self) -> None:
        """Temp files can only be leftovers of a crashed writer (the caller holds the writer lock)."""
        stale = [p for p in self.root.glob(TMP_PREFIX + "*") if p.is_file()]
        if self.dir.is_dir():
            for sub in self.dir.iterdir():
                if sub.is_dir():
                    stale.extend(p for p in sub.iterdir() if p.name.startswith(TMP_PREFIX))
        for p in stale:
            log.warning("registry %s: removing stale temp file %s (left by a crashed writer)", self.root, p)
            with contextlib.suppress(OSError):
                p.unlink()

    def drop_unreferenced_of(self, dropped: bytes, records: Path) -> None:
        """Delete the blobs named by rolled-back record lines ``dropped`` that no remaining line of
        ``records`` names (they were written for an add that never completed)."""
        names = set(re.findall(rb'"blob_sha256":"([0-9a-f]{64})"', dropped))
        if not names:
            return
        kept = set(re.findall(rb'"blob_sha256":"([0-9a-f]{64})"', records.read_bytes()))
        for sha in names - kept:
            with contextlib.suppress(OSError):
                self.path(sha.decode()).unlink()

    def unreferenced(self, keep: set[str]) -> list[Path]:
        """Stored blobs whose name is not in ``keep`` (what ``gc`` deletes)."""
        return [p for p in self.all() if p.name not in keep]

    def delete(self, paths: Sequence[Path]) -> None:
        """Delete blob files (``gc``), then fsync their directories."""
        for p in paths:
            p.unlink()
        for d in {p.parent for p in paths}:
            fsync_dir(d)

    # ---- checking ---------------------------------------------------------------------------

    def problems(self, blobs: Sequence[tuple[str, str, int]], referenced: set[str], full: bool) -> list[str]:
        """What is wrong with the blobs of live records ``[(record id, sha, bytes)]`` (``full``:
        re-hash each, decrypting first) and which stored blobs no record references."""
        out: list[str] = []
        for rid, sha, nbytes in blobs:
            p = self.path(sha)
            if not p.exists():
                out.append(f"record {rid}: blob {sha} is missing")
            elif p.stat().st_size != self.stored_size(nbytes):
                out.append(
                    f"record {rid}: blob {sha} has {p.stat().st_size} bytes, expected {self.stored_size(nbytes)}"
                )
            elif full:
                try:
                    ok = sha256_hex(self.plaintext(sha, _read_blob(p))) == sha
                except blobcrypt.BlobKeyError as exc:
                    out.append(f"record {rid}: blob {sha} cannot be decrypted: {exc}")
                    continue
                except BlobCorruptError as exc:
                    out.append(f"record {rid}: blob {sha} cannot be read: {exc}")
                    continue
                if not ok:
                    out.append(f"record {rid}: blob {sha} content does not match its hash")
        for p in self.all():
            if p.name not in referenced:
                out.append(f"orphan blob {p.name} (no record; left by an interrupted add — gc() removes it)")
        return out
