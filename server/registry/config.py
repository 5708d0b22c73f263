"""``registry.json``: the registry's configuration (format, representation, dim, bases, limits,
Chroma location, blob encryption) — created once by ``init``, read on open, rewritten atomically.

Also the on-disk names of everything in a registry directory, so no other part spells them.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.files.durable import TMP_PREFIX, atomic_write, fsync_dir
from common.files.safeio import UnsafeInputError, loads_json, read_regular_file
from server.registry.errors import NotARegistryError, RegistryCorruptError, RegistryError
from server.registry.lock import LOCK_NAME

REGISTRY_FORMAT = "rpe-registry-v1"
CONFIG_NAME = "registry.json"
RECORDS_NAME = "records.jsonl"
BLOBS_DIR = "blobs"
CHROMA_DIR = "chroma"
AUDIT_NAME = "audit.jsonl"
ZCOLUMN_NAME = "z.f32"  # the z column (server/zindex/column.py); its checksums are z.f32.crc
ZINDEX_NAME = "zindex.npz"  # ExactTopK's derived state (a cache: deleting it costs a rebuild)
COLLECTION = "lora_l2"
DEFAULT_LIMITS: dict[str, float] = {
    "max_rank": 256,
    "max_blob_bytes": 256 * 1024 * 1024,
    "max_modules": 4096,
    "max_meta_bytes": 64 * 1024,
    # finite but absurd values: a ΔW that would swamp every composition it enters, a z whose
    # squared norm would overflow float32 arithmetic (and can never be a sensible neighbour)
    "max_delta_norm": 1e4,
    "max_z_norm": 1e6,
    # relative bound (server/bounds.py): an adapter's per-module and total ‖ΔW‖ may be at most this
    # factor × the median of the registry's adapters of the same base and task, once there are
    # update_norm_min_reference of them; the composed adapter is checked against the same bound
    "update_norm_factor": 10.0,
    "update_norm_min_reference": 3,
    # issue 26 class 6: each site counts once (its latest adapter), and no limit is ever below this
    # floor, so near-zero adapters cannot drag the bound under what an honest adapter needs
    # (trained LoRA adapters here have a total ‖ΔW‖ of about 0.05)
    "update_norm_floor": 0.05,
}

__all__ = [
    "AUDIT_NAME",
    "BLOBS_DIR",
    "CHROMA_DIR",
    "COLLECTION",
    "CONFIG_NAME",
    "DEFAULT_LIMITS",
    "LOCK_NAME",
    "RECORDS_NAME",
    "REGISTRY_FORMAT",
    "TMP_PREFIX",
    "ZCOLUMN_NAME",
    "ZINDEX_NAME",
]


def now() -> str:
    """UTC timestamp with microseconds, the registry's one spelling of a time."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def base_entry(module_shapes: Mapping[str, Sequence[int]], name: str | None) -> dict[str, Any]:
    """The ``bases[fingerprint]`` entry: module shapes ``{module: [out, in]}``, checked."""
    if not isinstance(module_shapes, Mapping) or not module_shapes:
        raise RegistryError("module_shapes must be a non-empty {module name: (out, in)} mapping")
    modules: dict[str, list[int]] = {}
    for mod, shape in module_shapes.items():
        dims = [int(x) for x in shape]
        if not isinstance(mod, str) or len(dims) != 2 or min(dims) < 1:
            raise RegistryError(f"module_shapes[{mod!r}] must be (out, in) positive integers; got {shape!r}")
        modules[mod] = dims
    return {"name": name, "modules": dict(sorted(modules.items())), "added_at": now()}


def new_config(
    *,
    base_fingerprint: str,
    module_shapes: Mapping[str, Sequence[int]],
    embedding_dim: int,
    representation: str,
    chroma_host: str | None,
    chroma_port: int | None,
    base_name: str | None,
    limits: Mapping[str, int] | None,
    collection: str,
    blob_encryption: dict[str, str] | None,
) -> dict[str, Any]:
    """A fresh registry.json (every argument checked; nothing written)."""
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise RegistryError(f"embedding_dim must be a positive integer; got {embedding_dim!r}")
    if (chroma_host is None) != (chroma_port is None):
        raise RegistryError("give both chroma_host and chroma_port (a `chroma run` server) or neither")
    lim = dict(DEFAULT_LIMITS)
    for k, v in (limits or {}).items():
        if k not in DEFAULT_LIMITS:
            raise RegistryError(f"unknown limit {k!r}; known: {sorted(DEFAULT_LIMITS)}")
        lim[k] = float(v) if isinstance(DEFAULT_LIMITS[k], float) else int(v)
    chroma_cfg: dict[str, Any] = {"mode": "embedded", "collection": collection}
    if chroma_host is not None:
        if chroma_port is None:
            raise RegistryError(f"chroma host {chroma_host!r} given without a port; pass chroma_port too")
        chroma_cfg = {"mode": "http", "host": chroma_host, "port": int(chroma_port), "collection": collection}
    config = {
        "format": REGISTRY_FORMAT,
        "registry_id": uuid.uuid4().hex,
        "created_at": now(),
        "representation": representation,
        "embedding_dim": embedding_dim,
        "bases": {base_fingerprint: base_entry(module_shapes, base_name)},
        "limits": lim,
        "chroma": chroma_cfg,
    }
    if blob_encryption is not None:
        config["blob_encryption"] = blob_encryption
    return config


def write_config(root: Path, config: Mapping[str, Any]) -> None:
    """Replace registry.json atomically (0600 like every coordinator file: issue 10 item 7)."""
    atomic_write(root / CONFIG_NAME, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)


def read_config(root: Path) -> dict[str, Any]:
    """registry.json, or ``NotARegistryError`` / ``RegistryCorruptError`` saying what is wrong."""
    path = root / CONFIG_NAME
    if not path.is_file():
        raise NotARegistryError(
            f"{root} is not a registry (no {CONFIG_NAME}); create one with `rpe registry init` / "
            "Registry.init(path, base_fingerprint=..., module_shapes=..., embedding_dim=...)"
        )
    try:
        config: dict[str, Any] = loads_json(read_regular_file(path, 16 << 20, what="registry config"), str(path))
    except UnsafeInputError as exc:
        raise RegistryCorruptError(f"{path} is unreadable ({exc}); restore it from a backup") from None
    if not isinstance(config, dict):
        raise RegistryCorruptError(f"{path} is not a JSON object; restore it from a backup")
    for name in (RECORDS_NAME, AUDIT_NAME):
        other = root / name
        if other.exists() and not other.is_file():
            raise RegistryCorruptError(
                f"{other} is not a regular file (a FIFO, device or directory was put in "
                "its place); restore it from a backup"
            )
    if config.get("format") != REGISTRY_FORMAT:
        raise NotARegistryError(f"{path} has format {config.get('format')!r}, expected {REGISTRY_FORMAT!r}")
    return config


def empty_or_interrupted_init(root: Path) -> bool:
    """True for an empty directory or the leftovers of an ``init`` that crashed before writing
    registry.json (which is written last): an empty records.jsonl and an empty blob tree. The
    coordinator's key pair may be there already (``deploy.launch`` makes it up front, before the
    first run creates the registry around it; the registry then signs with it)."""
    for p in root.iterdir():
        if p.name in (LOCK_NAME, "coordinator.key", "coordinator.pub") or p.name.startswith(TMP_PREFIX):
            continue
        if p.name == RECORDS_NAME and p.is_file() and p.stat().st_size == 0:
            continue
        if p.name == BLOBS_DIR and p.is_dir() and not any(q.is_file() for q in p.rglob("*")):
            continue
        return False
    return True


def chroma_spec(
    config: Mapping[str, Any], chroma: str | tuple[str, int] | None, read_only: bool
) -> dict[str, Any] | None:
    """Where the Chroma mirror lives: ``{"mode": "embedded"|"http", ..., "collection"}`` or None (off)."""
    mode = chroma if chroma is not None else config.get("chroma", {}).get("mode", "embedded")
    spec: dict[str, Any] | None
    if isinstance(mode, (tuple, list)):
        spec = {"mode": "http", "host": mode[0], "port": int(mode[1])}
    elif mode == "off" or read_only:
        spec = None
    elif mode == "embedded":
        spec = {"mode": "embedded"}
    elif mode == "http":
        cc = config["chroma"]
        spec = {"mode": "http", "host": cc["host"], "port": int(cc["port"])}
    else:
        raise RegistryError(f"chroma must be 'off', 'embedded', 'http' or (host, port); got {mode!r}")
    if spec is not None:
        spec["collection"] = config.get("chroma", {}).get("collection", COLLECTION)
    return spec


def make_private(root: Path) -> None:
    """Tighten a registry made before issue 10 item 7: directories 0700, its own files 0600 (blobs
    0400). Best effort: a file owned by someone else keeps its mode (and ``verify`` does not care)."""
    for d in (root, root / BLOBS_DIR, root / CHROMA_DIR):
        if d.is_dir():
            with contextlib.suppress(OSError):
                os.chmod(d, 0o700)
    for name in (CONFIG_NAME, RECORDS_NAME, AUDIT_NAME, "coordinator.key"):
        p = root / name
        if p.is_file():
            with contextlib.suppress(OSError):
                os.chmod(p, 0o600)


def create(root: Path, config: Mapping[str, Any]) -> None:
    """Lay out a new registry directory; registry.json is written last, since its presence is what
    makes the directory a registry (an ``init`` that crashed earlier leaves a re-usable directory)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for d in (root, root / BLOBS_DIR, root / BLOBS_DIR / "sha256"):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)  # private: the coordinator's files are nobody else's business
    fd = os.open(root / RECORDS_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    write_config(root, config)
    fsync_dir(root)
    if root.parent.exists():
        fsync_dir(root.parent)
