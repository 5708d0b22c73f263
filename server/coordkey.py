"""The coordinator's own Ed25519 key: it signs what the coordinator delivers (``train.apply``).

Why: a site must install only adapters its coordinator stands behind. With a key of its own the
coordinator signs a ``delivery`` statement (``common/statements.py``) over the composed adapter's
sha256, the target and the run; each site pins ``<registry>/coordinator.pub`` in its node config
(``coordinator-key``) and refuses a delivery that is unsigned or signed by anyone else.

The key is made once, on first use, as ``<registry>/coordinator.key`` (0600, PKCS#8 PEM) with
``coordinator.pub`` next to it (the file an operator hands to the sites).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.durable import atomic_write
from common.signing import load_private_key, public_key_pem

KEY_FILE = "coordinator.key"
PUB_FILE = "coordinator.pub"


class CoordinatorKeyError(RuntimeError):
    """The coordinator key file exists but cannot be used (unreadable, not Ed25519, too open)."""


def load_or_create(registry_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The coordinator's signing key from ``<registry_dir>/coordinator.key``, created (0600) if missing."""
    root = Path(registry_dir)
    key_path, pub_path = root / KEY_FILE, root / PUB_FILE
    if key_path.exists():
        try:
            key = load_private_key(key_path)
        except Exception as exc:  # noqa: BLE001 - any unusable key file is the same operator error
            raise CoordinatorKeyError(f"{key_path}: {type(exc).__name__}: {exc}; restore the coordinator key "
                                      "from backup (sites pin its public key)") from None
        if not pub_path.exists():
            atomic_write(pub_path, public_key_pem(key.public_key()), mode=0o644)
        return key
    root.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(key_path, pem, mode=0o600)
    atomic_write(pub_path, public_key_pem(key.public_key()), mode=0o644)
    return key


def public_key_path(registry_dir: str | os.PathLike[str]) -> Path:
    """Where the coordinator's public key (the file a site's ``coordinator-key`` names) is."""
    return Path(registry_dir) / PUB_FILE
