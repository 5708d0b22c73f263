"""Who and where this site is: its settings (from the SuperNode's node config, or the run config in
simulation), its data, its task family, its base model and its signing key.

Configuration comes from the SuperNode's ``--node-config`` (deployment): ``site-id``,
``data-path`` (a JSONL file, or a directory with ``train.jsonl`` / ``eval.jsonl`` /
``unlabeled.jsonl``), ``model-path`` (base model directory or ``smollm2-135m-instruct``),
``site-dir`` (adapters, egress log, signing key); optional ``dp-noise-multiplier``,
``dp-max-grad-norm``, ``dp-delta`` (DP-SGD for the adapter), ``z-clip`` with ``z-noise-multiplier``
or ``z-epsilon``, ``z-delta`` (the Gaussian mechanism on z, ``common.privacy``), ``privacy-budget``
(the total ε the site will ever release; non-private releases and held-out metrics are then
refused) - the site's own privacy policy, off by default. The release policy
(``client/policy.py``, safe defaults): ``z-min-examples`` (10), ``z-layers`` ("-1"),
``metrics-min-reports`` (10). ``compute-dtype`` (auto, float32, bfloat16: what the site trains and
generates in; auto = bfloat16 on hardware that has it; z is always float32). ``coordinator-key``:
the coordinator's public key (PEM file,
``<registry>/coordinator.pub``); without it the site installs no delivery. Also ``threads`` (torch CPU threads; on a
shared or small machine 1 avoids oversubscription, which made generation ~50x slower on a loaded
2-core host). ``task`` (comma-separated families, default ``report-text``; each family's own keys,
e.g. segmentation's ``seg-dataset`` / ``seg-site``, are its ``node_config_keys``:
``common/families/``). In simulation the node
config holds only ``partition-id``: the run config's
``sim-sites``, ``sim-data-root``, ``sim-model-path`` and ``sim-site-root`` map it to a site
(and ``sim-coordinator-key``, ``sim-z-min-examples``, ``sim-z-layers``, ``sim-metrics-min-reports``
stand in for the node-config keys above).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context

from client.policy import ReleasePolicy, ReleasePolicyError
from common.families import DEFAULT_FAMILY, FAMILIES, UnknownFamilyError, get_family
from common.families.base import Family, FamilyError, SiteDataset, SiteInputs
from common.protocol import wire
from common.protocol.wire import WireError

EGRESS_FILE = "egress.jsonl"
DEFAULT_MODEL = "smollm2-135m-instruct"
#: the task families a site runs when its node config names none (the ONE place a request's
#: family is matched to the site's: :func:`site_family`)
DEFAULT_TASKS = (DEFAULT_FAMILY,)


class SiteError(RuntimeError):
    """The site cannot do what was asked (bad node config, missing data, mismatched base model)."""


@dataclass
class Site:
    """Where this site's things are (from the node config, or the run config in simulation)."""

    site: str
    data_path: Path
    model_path: str
    site_dir: Path
    policy: dict[str, float] = field(default_factory=dict)
    threads: int = 0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    #: what the site releases (``client/policy.py``; node config z-min-examples, z-layers, metrics-min-reports)
    release: ReleasePolicy = field(default_factory=ReleasePolicy)
    #: the coordinator's public key (PEM file) this site pinned: it installs only deliveries it signed
    coordinator_key: Path | None = None
    #: the SuperNode's own auth private key (node config ``supernode-key``): the site also signs its
    #: identity with it, so the coordinator can bind the site id to its registered SuperNode key
    supernode_key: Path | None = None
    #: work done only once the reply's egress line is on disk (e.g. caching a released z)
    after_logged: list[Any] = field(default_factory=list)
    #: the node-config keys its families read (each family's ``node_config_keys``)
    options: dict[str, str] = field(default_factory=dict)
    #: the dtype the site trains and generates in (node config ``compute-dtype``: auto, float32,
    #: bfloat16; ``common.models.compute_dtype``); z is always float32
    compute_dtype: str = "auto"

    @property
    def egress_path(self) -> Path:
        return self.site_dir / EGRESS_FILE

    @property
    def adapters_dir(self) -> Path:
        """``own-<task>`` (the site's own adapters) and one new directory per delivered adapter; a
        delivery never writes into an existing directory (``client/handlers.py``)."""
        return self.site_dir / "adapters"

    @property
    def key_path(self) -> Path:
        return self.site_dir / "keys" / f"{self.site}.key"

    def inputs(self) -> SiteInputs:
        """What a family may know of this site (no keys, no policy)."""
        return SiteInputs(self.site, self.data_path, self.model_path, self.site_dir, dict(self.options))


def split_list(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def site_from_context(context: Context) -> Site:
    """Resolve the site from ``node_config`` (deployment) or ``partition-id`` + run config (simulation)."""
    nc, rc = context.node_config, context.run_config
    if "site-id" in nc:
        site = str(nc["site-id"])
        data: Any = nc.get("data-path")
        if not data:
            raise SiteError(f"site {site!r}: node config has no 'data-path' (a JSONL file or directory)")
        model = str(nc.get("model-path") or DEFAULT_MODEL)
        site_dir = Path(str(nc.get("site-dir") or Path.cwd() / f"rpe-site-{site}"))
        policy_src: Any = nc
        pinned = nc.get("coordinator-key")
    elif "partition-id" in nc:
        sites = split_list(rc.get("sim-sites"))
        pid = int(nc["partition-id"])
        if pid >= len(sites):
            raise SiteError(f"simulation partition {pid} has no site: run config sim-sites lists {sites}")
        site = sites[pid]
        root = Path(str(rc.get("sim-data-root") or "."))
        data = root / f"{site}.jsonl" if (root / f"{site}.jsonl").exists() else root / site
        model = str(rc.get("sim-model-path") or DEFAULT_MODEL)
        site_dir = Path(str(rc.get("sim-site-root") or Path.cwd() / "rpe-sites")) / site
        policy_src = {}
        # simulation runs the whole federation in one trusted process: the run config names the pin
        pinned = rc.get("sim-coordinator-key")
    else:
        raise SiteError("node config has neither 'site-id' (deployment) nor 'partition-id' (simulation)")
    if not wire._SITE_RE.match(site):
        raise SiteError(f"site id {site!r} is not a plain identifier")
    policy = privacy_policy(policy_src)
    deployed = "site-id" in nc
    if deployed:
        ignore_run_config_overrides(site, rc)
    # a deployed site's own settings come from its node config alone (issue 26 class 10): the run
    # config is the coordinator's, and the sim-* keys exist only for the one-process simulation
    threads = int(nc.get("threads", 0) or (0 if deployed else rc.get("sim-threads", 0)) or 0)
    try:
        release = ReleasePolicy.from_node_config(nc if "site-id" in nc else sim_release_config(rc))
    except ReleasePolicyError as exc:
        raise SiteError(str(exc)) from None
    coord = Path(str(pinned)).expanduser() if pinned else None
    node_key = nc.get("supernode-key") if "site-id" in nc else None
    tasks = tuple(split_list(nc.get("task"))) or DEFAULT_TASKS
    unknown = [t for t in tasks if t not in FAMILIES]
    if unknown:
        raise SiteError(
            f"site {site!r}: node config task names {', '.join(map(repr, unknown))}, not a task family "
            f"this ClientApp has; known: {', '.join(FAMILIES)}"
        )
    options = {k: str(nc[k]) for k in family_option_keys(tasks) if k in nc}
    dtype = str(nc.get("compute-dtype") or (None if deployed else rc.get("sim-compute-dtype")) or "auto")
    if dtype not in wire.COMPUTE_DTYPES:
        raise SiteError(
            f"site {site!r}: compute-dtype {dtype!r} is not one of {', '.join(wire.COMPUTE_DTYPES)} "
            "(auto: bfloat16 where the CPU/GPU has it in hardware, else float32)"
        )
    return Site(
        site,
        Path(str(data)).expanduser(),
        model,
        site_dir.expanduser().resolve(),
        policy,
        threads,
        tasks,
        options=options,
        release=release,
        coordinator_key=coord,
        supernode_key=Path(str(node_key)).expanduser() if node_key else None,
        compute_dtype=dtype,
    )


#: run-config keys that would set a SITE's own settings (threads, compute dtype, data and model
#: paths, site directory, release policy, coordinator key): read only by a simulated site
SITE_RUN_CONFIG_KEYS = (
    "sim-sites",
    "sim-data-root",
    "sim-model-path",
    "sim-site-root",
    "sim-threads",
    "sim-compute-dtype",
    "sim-coordinator-key",
    "sim-z-min-examples",
    "sim-z-layers",
    "sim-metrics-min-reports",
)
_DEFAULT_OFF = (None, "", 0, 0.0, "0", "auto")


def ignore_run_config_overrides(site: str, rc: Any) -> list[str]:
    """At a deployed site, the run config's site keys (``SITE_RUN_CONFIG_KEYS``) are ignored: the node
    config wins. Each one the coordinator set is named in the SuperNode's log, so the site's operator
    sees the attempt; the list is returned (for tests)."""
    tried = sorted(k for k in SITE_RUN_CONFIG_KEYS if rc.get(k) not in _DEFAULT_OFF)
    if tried:
        print(
            f"[{site}] ignoring run-config {', '.join(f'{k}={rc.get(k)!r}' for k in tried)}: a deployed site's "
            "threads, compute dtype, paths and release policy come from its node config only",
            flush=True,
        )
    return tried


def sim_release_config(rc: Any) -> dict[str, Any]:
    """The release-policy keys of a simulated site: ``sim-z-min-examples``, ``sim-z-layers`` and
    ``sim-metrics-min-reports`` of the run config (0 or "" = the safe default)."""
    out = {}
    for key in ("z-min-examples", "z-layers", "metrics-min-reports"):
        value = rc.get(f"sim-{key}")
        if value not in (None, "", 0):
            out[key] = value
    return out


def privacy_policy(src: Any) -> dict[str, float]:
    """The site's privacy keys from its node config, checked (a bad policy stops the site early)."""
    from common.privacy import PrivacyConfigError, check_policy

    try:
        return check_policy(src)
    except PrivacyConfigError as exc:
        raise SiteError(str(exc)) from None


def family_option_keys(tasks: tuple[str, ...]) -> list[str]:
    """The node-config keys the site's families read (``Family.node_config_keys``)."""
    return [key for name in tasks for key in get_family(name).node_config_keys]


def site_family(site: Site, name: str | None) -> Family:
    """The family a request's ``task`` names (none: the default family), if this site runs it."""
    name = name or DEFAULT_FAMILY
    if name not in site.tasks:
        known = sorted(t for t in site.tasks if t in FAMILIES)
        raise SiteError(f"unknown task {name!r}; this site can train {known}")
    try:
        return get_family(name)
    except UnknownFamilyError as exc:
        raise SiteError(f"unknown task {name!r}: {exc}") from None


def family_options(family: Family, cfg: dict[str, Any]) -> dict[str, Any]:
    """The request's ``options`` (a flat JSON object; its shape is the wire's check), each a setting
    this family takes (``Family.option_keys``) with a value of the type it takes."""
    raw = cfg.get("options")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise WireError(f"not JSON ({exc})", "config", "options") from None
    if not isinstance(options, dict):
        raise WireError("expected a JSON object", "config", "options")
    for key, value in options.items():
        accepted = family.option_keys.get(key)
        if accepted is None:
            takes = ", ".join(sorted(family.option_keys)) or "none"
            raise WireError(
                f"the {family.name} family takes no option {key!r} (it takes: {takes})", "config", "options"
            )
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            raise WireError(
                f"option {key!r} of the {family.name} family: {value!r} is not {accepted}", "config", "options"
            )
    return options


#: the earlier name of :func:`site_family`
site_task = site_family

#: a site's examples (``common.families.base.SiteDataset``)
SiteData = SiteDataset


def load_family_data(site: Site, family: Family) -> SiteDataset:
    """The site's examples as ``family`` reads them (a family's own error becomes a ``SiteError``)."""
    try:
        return family.load_data(site.inputs())
    except FamilyError as exc:
        raise SiteError(str(exc)) from None


def load_site_data(path: Path) -> SiteDataset:
    """A report site's examples: a JSONL file (labeled lines train, unlabeled lines are unlabeled)
    or a directory of ``train.jsonl`` / ``eval.jsonl`` / ``unlabeled.jsonl``."""
    from common.families.report.family import load_site_examples

    try:
        return load_site_examples(path)
    except FamilyError as exc:
        raise SiteError(str(exc)) from None


def signing_key(site: Site) -> Any:
    """The site's Ed25519 key ``<site-dir>/keys/<site>.key`` (``common.trust.signing``), or None."""
    if not site.key_path.exists():
        return None
    from common.trust.signing import load_private_key

    return load_private_key(site.key_path)


def key_id(site: Site) -> str:
    """Fingerprint of the site's public key ("" without a key)."""
    key = signing_key(site)
    if key is None:
        return ""
    from common.trust.signing import key_fingerprint

    return key_fingerprint(key.public_key())
