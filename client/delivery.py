"""What a site checks before it installs or scores anything the coordinator sends, for every family:
the coordinator's ``delivery`` signature (against the key the site pinned), the adapter's base and
hash, and a NEW directory for a stored adapter. Used by ``train.apply`` (``client/handlers.py``) and
``train.evaluate`` (``client/arms.py``)."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from client.policy import ReleaseRefused
from client.site import Site, SiteError
from common.protocol import wire
from common.protocol.wire import WireError

#: the prefix of the site's own adapters (``adapters/own-<task>``): no delivery may take it
OWN_PREFIX = "own-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class DeliveryRefused(ReleaseRefused):
    """A ``train.apply`` this site will not install: unsigned, signed by another key, or for
    another site, run, adapter or request; or its name is taken."""


def check_name(name: str) -> None:
    """A delivered adapter's name: a plain file name that is not one of the site's own."""
    if not _NAME_RE.match(name) or name.startswith(OWN_PREFIX):
        raise WireError(
            f"adapter name must be a plain file name not starting with {OWN_PREFIX!r} (the site's own adapters)",
            "config",
            "name",
        )


def check_delivery(site: Site, cfg: dict[str, Any], run_id: str) -> None:
    """The coordinator's ``delivery`` statement must verify against the key this site pinned
    (node config ``coordinator-key``) and name exactly this adapter, this site, run and request."""
    from common.trust.signing import SigningError, load_public_key
    from common.trust.statements import StatementError, verify_statement

    if site.coordinator_key is None:
        raise DeliveryRefused(
            "no-coordinator-key",
            "this site has no coordinator key pinned (node config "
            "'coordinator-key' = the coordinator's coordinator.pub); it installs only "
            "deliveries signed by its coordinator",
        )
    if not cfg.get("delivery"):
        raise DeliveryRefused("unsigned-delivery", "the delivery carries no coordinator signature; refused")
    try:
        pub = load_public_key(site.coordinator_key)
    except (OSError, SigningError) as exc:
        raise SiteError(f"the pinned coordinator key {site.coordinator_key} is unusable: {exc}") from None
    expect = {
        "blob_sha256": cfg["blob_sha256"],
        "target": site.site,
        "run_id": run_id,
        "name": cfg["name"],
        "nonce": cfg["nonce"],
    }
    try:
        verify_statement(pub, json.loads(cfg["delivery"]), "delivery", expect=expect)
    except (ValueError, StatementError) as exc:
        raise DeliveryRefused("bad-delivery", f"the delivery statement does not hold: {exc}") from None


def rebuild_adapter(
    arrays: Any,
    lora_config: Any,
    sha256: str,
    fp: str,
    base: str,
    what: str = "the composed adapter",
    record: str = "adapter",
) -> Any:
    """The adapter as sent (wire ``record``), for this site's base (fingerprint ``fp``), its hash
    checked against the request's ``sha256``; ``base`` is the fingerprint the request names."""
    if base != fp:
        raise SiteError(f"{what} is for base model {base}, this site runs {fp}")
    adapter = wire.adapter_from_wire(arrays, lora_config, base_model=fp)
    got = wire.adapter_sha256(adapter)
    if got != sha256:
        raise WireError(f"{what} hashes to {got}, the request says {sha256}", record)
    return adapter


def received_adapter(req: wire.Request, fp: str) -> tuple[Any, str]:
    """The adapter of a ``train.apply`` (for this site's base, fingerprint ``fp``) and its hash."""
    cfg = req.config
    assert req.adapter is not None and req.lora_config is not None
    adapter = rebuild_adapter(req.adapter, req.lora_config, cfg["blob_sha256"], fp, cfg["base_fingerprint"])
    return adapter, cfg["blob_sha256"]


def store_received(site: Site, cfg: dict[str, Any], adapter: Any, base_path: str) -> None:
    """``adapters/<name>/``, a NEW directory: a PEFT directory plus ``rpe-provenance.json`` (sources,
    weights, hash), written to a temporary directory and renamed into place. An existing name is
    refused (a delivery can never overwrite the site's own or an earlier adapter), except the same
    adapter again (a re-sent message). ``base_path``: what the PEFT config names as base."""
    import os
    import shutil

    from common.adapters import save_peft_adapter

    final = site.adapters_dir / cfg["name"]
    if final.exists() or final.is_symlink():
        try:
            same = json.loads((final / "rpe-provenance.json").read_text()).get("blob_sha256") == cfg["blob_sha256"]
        except (OSError, ValueError, AttributeError):
            same = False
        if same:
            return
        raise DeliveryRefused(
            "name-taken", f"an adapter named {cfg['name']!r} already exists at this site; a delivery never replaces one"
        )
    tmp = site.adapters_dir / f".incoming-{cfg['name']}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out = save_peft_adapter(adapter, tmp, base_path)
    provenance = {k: cfg.get(k) for k in ("strategy", "blob_sha256", "task")}
    # the delivery carries its lists as JSON text (a config record holds scalars): stored as lists
    provenance["sources"] = _json_list(cfg.get("sources"))
    provenance["weights"] = _json_list(cfg.get("weights"))
    provenance["nearness"] = cfg.get("nearness")  # the coordinator's "nothing close enough" check, as sent
    provenance["normalisation"] = cfg.get("normalisation")  # update-norm: mode and scales c_i, as sent
    provenance["received_at"] = time.time()
    (out / "rpe-provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    os.rename(out, final)


def _json_list(value: Any) -> list[Any]:
    """A list the delivery carries as JSON text (``server/modes/compose.py``), as a list."""
    if isinstance(value, list):
        return value
    try:
        got = json.loads(value) if isinstance(value, str) and value else []
    except ValueError:
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return got if isinstance(got, list) else [got]
