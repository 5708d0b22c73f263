"""Open the run's registry (or create it from the base model on the first run), with its blob key.

The blob key (``blob-key-file``, else the SuperLink's environment) is loaded first, so a bad key
fails the run before any site is asked to train; so does a missing key for an encrypted registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.messaging import log
from server.settings import Settings


def open_registry(s: Settings) -> Any:
    """Open ``registry-dir``; create it from ``base-model`` (on the coordinator) if it does not exist.

    The blob key (``blob-key-file``, else the environment) is loaded first, so a bad key fails the
    run before any site is asked to train; so does a missing key for an encrypted registry."""
    from server.registry.blobcrypt import load_blob_key

    reg = _open_or_create(s, load_blob_key(s.blob_key_file or None))
    if not reg.has_blob_key and s.mode != "whoami":
        reg.close()
        raise ValueError(
            f"registry {reg.path} stores adapter blobs encrypted (key {reg.blob_encryption['key_id']}) and this "
            f"{s.mode} run has no key: set run config 'blob-key-file', or $RPE_BLOB_KEY_FILE on the SuperLink"
        )
    return reg


def family_registry_dir(s: Settings) -> Path:
    """The registry directory of the run's task family: where the family says
    (``common.families.family_registry_dir``; ``registry-dir`` itself for reports)."""
    from common.families import UnknownFamilyError
    from common.families import family_registry_dir as registry_dir_of

    try:
        return registry_dir_of(s.registry_dir, s.task)
    except UnknownFamilyError as exc:
        raise ValueError(f"run config task={s.task!r}: {exc}") from None


def _open_or_create(s: Settings, blob_key: Any) -> Any:
    from server.registry import Registry

    path = family_registry_dir(s)
    root = Path(s.registry_dir).expanduser()
    chroma: Any = None
    if s.chroma == "off":
        chroma = "off"
    elif ":" in s.chroma:
        host, port = s.chroma.rsplit(":", 1)
        chroma = (host, int(port))
    if (path / "registry.json").is_file():
        if path != root and any(p.is_symlink() for p in (path / "coordinator.key", path / "coordinator.pub")):
            share_coordinator_key(root, path)  # an older version linked the key: now a copy
        if s.base_model:
            check_base_model(s, path)
        return Registry(path, chroma=chroma, blob_key=blob_key)
    if not s.base_model:
        raise ValueError(
            f"{path} holds no registry yet: create it with `rpe registry init`, or set run config "
            "'base-model' to the base model directory so the first run creates it"
        )
    return _create_registry(s, path, root, chroma, blob_key)


def check_base_model(s: Settings, path: Path) -> None:
    """``base-model`` given for an existing registry must be a base it holds: a contradiction fails
    the run before the registry is opened (nothing written), naming both bases (issue 27 item 4)."""
    from common.families import get_family
    from common.families.base import SiteInputs
    from server.registry import config as cfg

    bases = cfg.read_config(path)["bases"]
    fp = get_family(s.task).base_fingerprint(SiteInputs("coordinator", path, s.base_model, path))  # cached on disk
    if fp in bases:
        return
    held = "; ".join(f"{b.get('name') or '?'} ({f})" for f, b in sorted(bases.items()))
    raise ValueError(
        f"run config base-model={s.base_model!r} is base {fp}, but registry {path} holds adapters of base {held}: "
        "adapters of two bases never mix. Leave base-model empty to use the registry's base, or set registry-dir "
        "to a new directory for this base"
    )


def _create_registry(s: Settings, path: Path, root: Path, chroma: Any, blob_key: Any) -> Any:
    """The run's family's registry, from the family's view of ``base-model``: module shapes, z dim,
    fingerprint and representation. A family's own directory signs with the root's key."""
    from common.families import get_family
    from server.registry import Registry

    family = get_family(s.task)
    base = family.registry_base(s.base_model)
    log(
        f"creating {family.name} registry {path} for base {base.base_name} "
        f"({len(base.module_shapes)} linear modules, z dim {base.embedding_dim})"
    )
    kwargs: dict[str, Any] = {}
    if isinstance(chroma, tuple):
        kwargs = {"chroma_host": chroma[0], "chroma_port": chroma[1]}
    reg = Registry.init(
        path,
        base_fingerprint=base.fingerprint,
        module_shapes=base.module_shapes,
        embedding_dim=base.embedding_dim,
        representation=family.registry.representation,
        base_name=base.base_name,
        exist_ok=True,
        blob_key=blob_key,
        **kwargs,
    )
    if path != root:
        share_coordinator_key(root, path)
    if chroma == "off":
        reg.close()
        reg = Registry(path, chroma="off", blob_key=blob_key)
    return reg


def share_coordinator_key(root: Path, family_dir: Path) -> None:
    """A family's registry signs receipts and deliveries with the coordinator's ONE key (the root
    registry's ``coordinator.key``, the ``coordinator.pub`` every site pins): the key pair its init
    made (before it signed anything), or links an older version left, become copies of the root's.

    Copies, not links: a registry holds no symlink, so a family registry copied or backed up on its
    own still opens (a relative link to ``../coordinator.key`` dangled there and its open failed)."""
    from common.files.durable import atomic_write
    from server.registry import coordkey

    coordkey.ensure_key(root)
    for src, dst, mode in zip(coordkey.key_paths(root), coordkey.key_paths(family_dir), (0o600, 0o644), strict=True):
        data = src.read_bytes()
        if not dst.is_symlink() and dst.is_file() and dst.read_bytes() == data:
            continue
        atomic_write(dst, data, mode=mode)  # the rename replaces a link itself, never its target
