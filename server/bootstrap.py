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


#: task families whose z is not the report family's: each keeps its own registry (own z dim and
#: representation, own index) under ``<registry-dir>/<family>/``, so a query can never mix them
SEPARATE_FAMILIES = ("segmentation",)


def family_registry_dir(s: Settings) -> Path:
    """The registry directory of the run's task family (``registry-dir`` for reports)."""
    root = Path(s.registry_dir).expanduser()
    return root / s.task if s.task in SEPARATE_FAMILIES else root


def _open_or_create(s: Settings, blob_key: Any) -> Any:
    from server.registry import Registry

    path = family_registry_dir(s)
    chroma: Any = None
    if s.chroma == "off":
        chroma = "off"
    elif ":" in s.chroma:
        host, port = s.chroma.rsplit(":", 1)
        chroma = (host, int(port))
    if (path / "registry.json").is_file():
        return Registry(path, chroma=chroma, blob_key=blob_key)
    if not s.base_model:
        raise ValueError(
            f"{path} holds no registry yet: create it with `rpe registry init`, or set run config "
            "'base-model' to the base model directory so the first run creates it"
        )
    if s.task == "segmentation":
        return _create_sam_registry(s, path, chroma, blob_key)
    from transformers import AutoConfig

    from common.models import fingerprint, resolve_model_dir

    model_dir = resolve_model_dir(s.base_model)
    shapes = _linear_shapes(model_dir)
    hidden = int(AutoConfig.from_pretrained(str(model_dir)).hidden_size)
    log(f"creating registry {path} for base {model_dir} ({len(shapes)} linear modules, z dim {hidden})")
    kwargs: dict[str, Any] = {}
    if isinstance(chroma, tuple):
        kwargs = {"chroma_host": chroma[0], "chroma_port": chroma[1]}
    reg = Registry.init(
        path,
        base_fingerprint=fingerprint(model_dir),
        module_shapes=shapes,
        embedding_dim=hidden,
        base_name=str(model_dir),
        exist_ok=True,
        blob_key=blob_key,
        **kwargs,
    )
    if chroma == "off":
        reg.close()
        reg = Registry(path, chroma="off", blob_key=blob_key)
    return reg


def share_coordinator_key(root: Path, family_dir: Path) -> None:
    """A family's registry signs receipts and deliveries with the coordinator's ONE key (the root
    registry's ``coordinator.key``, the ``coordinator.pub`` every site pins): the key pair its init
    made is replaced by links to the root's (before it signed anything)."""
    import os

    from server.registry import coordkey

    coordkey.ensure_key(root)
    for src, dst in zip(coordkey.key_paths(root), coordkey.key_paths(family_dir), strict=True):
        if dst.is_symlink():
            continue
        link = dst.with_name(dst.name + ".link")
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(src, family_dir), link)
        os.replace(link, dst)


def _create_sam_registry(s: Settings, path: Path, chroma: Any, blob_key: Any) -> Any:
    """A registry for SAM adapters: the base's linear shapes, z = the encoder's channel count."""
    from common.families.segmentation import sam
    from common.families.segmentation.task import REPRESENTATION
    from common.models import linear_module_shapes
    from server.registry import Registry

    model = sam.load_sam(s.base_model)
    shapes = linear_module_shapes(model)
    dim = int(model.rpe_config["embed_dim"])
    log(f"creating registry {path} for SAM base {s.base_model} ({len(shapes)} linear modules, z dim {dim})")
    kwargs: dict[str, Any] = {}
    if isinstance(chroma, tuple):
        kwargs = {"chroma_host": chroma[0], "chroma_port": chroma[1]}
    reg = Registry.init(
        path,
        base_fingerprint=sam.model_fingerprint(model),
        module_shapes=shapes,
        embedding_dim=dim,
        representation=REPRESENTATION,
        base_name=str(s.base_model),
        exist_ok=True,
        blob_key=blob_key,
        **kwargs,
    )
    share_coordinator_key(Path(s.registry_dir).expanduser(), path)
    if chroma == "off":
        reg.close()
        reg = Registry(path, chroma="off", blob_key=blob_key)
    return reg


def _linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module shapes of the base model without loading its weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.models import linear_module_shapes

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_module_shapes(model)
