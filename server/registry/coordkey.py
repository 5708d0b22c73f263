"""The coordinator's Ed25519 key, ``REG/coordinator.key`` (0600, in the 0700 registry), and its export.

Why: the audit chain has no secret, so a coordinator (or anyone with its disk) can rewrite or cut
its tail. A receipt signed with this key, kept by the site, is an outside witness of the head the
coordinator once had (``server.audit.receipt``). The public key ``coordinator.pub`` is what
sites (and ``rpe audit cross-check --coordinator-key``) check receipts and deliveries with; copy
it to each site once, out of band.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.trust.signing import generate_keypair, load_private_key, load_public_key

KEY_NAME = "coordinator"


def key_paths(root: Path) -> tuple[Path, Path]:
    """(private, public) key paths of the registry at ``root``: one key signs receipts and deliveries."""
    return root / f"{KEY_NAME}.key", root / f"{KEY_NAME}.pub"


def ensure_key(root: Path) -> None:
    """Create the key pair if missing (on init, and once for registries made before it existed)."""
    priv, pub = key_paths(root)
    if priv.exists() and pub.exists():
        return
    d = priv.parent
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    generate_keypair(d, KEY_NAME)


def load_key(root: Path) -> Any:
    """The coordinator's private key (``Ed25519PrivateKey``)."""
    return load_private_key(key_paths(root)[0])


def load_public(root: Path) -> Any:
    """The coordinator's public key (``Ed25519PublicKey``)."""
    return load_public_key(key_paths(root)[1])
