"""The coordinator's own Ed25519 key: it signs what the coordinator delivers (``train.apply``).

Why: a site must install only adapters its coordinator stands behind. With a key of its own the
coordinator signs a ``delivery`` statement (``common/trust/statements.py``) over the composed adapter's
sha256, the target and the run; each site pins ``<registry>/coordinator.pub`` in its node config
(``coordinator-key``) and refuses a delivery that is unsigned or signed by anyone else.

The key is made once, on first use, as ``<registry>/coordinator.key`` (0600, PKCS#8 PEM) with
``coordinator.pub`` next to it (the file an operator hands to the sites).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.registry import coordkey as registry_key


def load_or_create(registry_dir: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The coordinator's signing key (the registry's one key, ``server/registry/coordkey.py``), created if missing."""
    root = Path(registry_dir)
    registry_key.ensure_key(root)
    return registry_key.load_key(root)


def public_key_path(registry_dir: str | os.PathLike[str]) -> Path:
    """Where the coordinator's public key (the file a site's ``coordinator-key`` names) is."""
    return registry_key.key_paths(Path(registry_dir))[1]
