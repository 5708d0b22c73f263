"""The deployment's state: ``<workdir>/launch-state.json`` (every process this tool started, with its
PID and start time, the SuperLink's address, the registered node ids) and what a SuperNode is
(``SiteSpec``, its node config, and the spec a recorded node config gives back).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.privacy import POLICY_KEYS, PrivacyConfigError, check_policy
from deploy.launch.errors import LaunchError

STATE_FILE = "launch-state.json"
FEDERATION = "rpe"
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_PORT = 9094


@dataclass
class SiteSpec:
    """One SuperNode: its site id and the node config the ClientApp reads."""

    site: str
    data_path: str
    model_path: str = ""
    site_dir: str = ""
    port: int = 0
    threads: int = 0
    #: the site's privacy policy, node-config keys of ``common.privacy.POLICY_KEYS`` (off when empty)
    privacy: dict[str, float] = field(default_factory=dict)
    #: SHA-256 of the app bundle(s) the site approved (comma-separated); checked by client/pin.py
    app_sha256: str = ""
    #: the coordinator public key (PEM file) the site pins: it installs only deliveries signed with it
    coordinator_key: str = ""
    #: the site's release policy, node-config keys of ``client/policy.py`` (z-min-examples, z-layers,
    #: metrics-min-reports; the site's safe defaults when empty)
    release: dict[str, Any] = field(default_factory=dict)
    #: further node-config keys, e.g. a segmentation site's ``task``, ``seg-dataset``, ``seg-site``
    extra: dict[str, Any] = field(default_factory=dict)

    def node_config(self) -> dict[str, Any]:
        """The node config the ClientApp reads (``--node-config``), empty optional keys left out."""
        out: dict[str, Any] = {
            "site-id": self.site,
            "data-path": self.data_path,
            "model-path": self.model_path,
            "site-dir": self.site_dir,
        }
        if self.threads:
            out["threads"] = self.threads
        if self.app_sha256:
            out["app-sha256"] = self.app_sha256
        if self.coordinator_key:
            out["coordinator-key"] = self.coordinator_key
        out.update({k: float(v) for k, v in self.privacy.items()})
        out.update(self.release)
        out.update(self.extra)
        return out


def privacy_args(items: list[str], site: str | None = None) -> dict[str, float]:
    """``--privacy [SITE:]KEY=VALUE`` flags as a checked policy (the same check the ClientApp makes);
    with ``site``, items prefixed with another site are skipped."""
    policy: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if ":" in key and site is not None:
            owner, key = key.split(":", 1)
            if owner != site:
                continue
        if not sep or key not in POLICY_KEYS:
            raise LaunchError(f"--privacy {item!r}: expected KEY=VALUE with KEY one of {list(POLICY_KEYS)}")
        try:
            policy[key] = float(value)
        except ValueError:
            raise LaunchError(f"--privacy {item!r}: {value!r} is not a number") from None
    try:
        return check_policy(policy)
    except PrivacyConfigError as exc:
        raise LaunchError(f"--privacy: {exc}") from None


def load_state(workdir: Path) -> dict[str, Any]:
    """The workdir's state (an empty one, no SuperLink and no sites, if there is none yet)."""
    path = Path(workdir) / STATE_FILE
    if not path.exists():
        return {"workdir": str(Path(workdir).resolve()), "superlink": None, "sites": {}}
    return json.loads(path.read_text())


def save_state(workdir: Path, state: dict[str, Any]) -> None:
    """Write the state atomically (temporary file, rename): a reader never sees half of it."""
    path = Path(workdir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


_SPEC_KEYS = frozenset(
    {"site-id", "data-path", "model-path", "site-dir", "threads", "app-sha256", "coordinator-key", "supernode-key"}
)


def spec_from_node_config(site: str, nc: dict[str, Any], port: int = 0) -> SiteSpec:
    """The :class:`SiteSpec` whose ``node_config()`` is ``nc`` again: every key kept (release policy,
    privacy policy, task family, compute dtype...), so a restarted SuperNode is the same site."""
    return SiteSpec(
        site,
        nc["data-path"],
        nc.get("model-path", ""),
        nc.get("site-dir", ""),
        port,
        int(nc.get("threads", 0)),
        {k: float(nc[k]) for k in POLICY_KEYS if k in nc},
        str(nc.get("app-sha256", "")),
        str(nc.get("coordinator-key", "")),
        extra={k: v for k, v in nc.items() if k not in _SPEC_KEYS and k not in POLICY_KEYS},
    )
