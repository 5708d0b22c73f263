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
2-core host). ``task`` (comma-separated families, default ``report-text``; ``segmentation`` with
``seg-dataset`` / ``seg-site`` / ``seg-copies``: ``client/seg_handlers.py``). In simulation the node
config holds only ``partition-id``: the run config's
``sim-sites``, ``sim-data-root``, ``sim-model-path`` and ``sim-site-root`` map it to a site
(and ``sim-coordinator-key``, ``sim-z-min-examples``, ``sim-z-layers``, ``sim-metrics-min-reports``
stand in for the node-config keys above).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context

from client.policy import ReleasePolicy, ReleasePolicyError
from common.families.report.data import Example, read_jsonl
from common.protocol import wire

TRAIN_FILE, EVAL_FILE, UNLABELED_FILE = "train.jsonl", "eval.jsonl", "unlabeled.jsonl"
EGRESS_FILE = "egress.jsonl"
DEFAULT_MODEL = "smollm2-135m-instruct"
#: the task families this ClientApp can run (the ONE place a site's task is chosen: :func:`site_task`)
DEFAULT_TASKS = ("report-text",)
#: node-config keys of a segmentation site (``client/seg_handlers.py``)
SEG_KEYS = ("seg-dataset", "seg-site", "seg-copies")


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
    #: segmentation sites: ``seg-dataset``, ``seg-site``, ``seg-copies`` from the node config
    seg: dict[str, str] = field(default_factory=dict)
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


def split_list(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def site_from_context(context: Context) -> Site:
    """Resolve the site from ``node_config`` (deployment) or ``partition-id`` + run config (simulation)."""
    nc, rc = context.node_config, context.run_config
    if "site-id" in nc:
        site = str(nc["site-id"])
        data = nc.get("data-path")
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
    threads = int(nc.get("threads", 0) or rc.get("sim-threads", 0) or 0)
    try:
        release = ReleasePolicy.from_node_config(nc if "site-id" in nc else sim_release_config(rc))
    except ReleasePolicyError as exc:
        raise SiteError(str(exc)) from None
    coord = Path(str(pinned)).expanduser() if pinned else None
    node_key = nc.get("supernode-key") if "site-id" in nc else None
    tasks = tuple(split_list(nc.get("task"))) or DEFAULT_TASKS
    seg = {k: str(nc[k]) for k in SEG_KEYS if k in nc}
    dtype = str(nc.get("compute-dtype") or rc.get("sim-compute-dtype") or "auto")
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
        seg=seg,
        release=release,
        coordinator_key=coord,
        supernode_key=Path(str(node_key)).expanduser() if node_key else None,
        compute_dtype=dtype,
    )


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


def site_task(site: Site, name: str) -> Any:
    """The task object for a request's task name, if this site runs that family (``common/families/report/task.py``)."""
    from common.families.report.task import TextReportTask
    from common.families.segmentation.task import SegmentationTask

    known: dict[str, Any] = {"report-text": TextReportTask, "segmentation": SegmentationTask}
    if name not in known or name not in site.tasks:
        raise SiteError(f"unknown task {name!r}; this site can train {sorted(set(site.tasks) & set(known))}")
    return known[name]()


@dataclass
class SiteData:
    """The site's examples: labeled training data, labeled held-out data, unlabeled data."""

    train: list[Example]
    eval: list[Example]
    unlabeled: list[Example]

    @property
    def all(self) -> list[Example]:
        return [*self.train, *self.eval, *self.unlabeled]

    @property
    def groups(self) -> list[str]:
        return [g for g, _ in Counter(e.group for e in self.all).most_common()]


def load_site_data(path: Path) -> SiteData:
    """A JSONL file (labeled lines train, unlabeled lines are unlabeled) or a directory of them."""
    if path.is_dir():
        files = {name: path / name for name in (TRAIN_FILE, EVAL_FILE, UNLABELED_FILE)}
        if not any(f.exists() for f in files.values()):
            raise SiteError(f"{path}: expected {TRAIN_FILE}, {EVAL_FILE} and/or {UNLABELED_FILE}")
        rows = {name: read_jsonl(f) if f.exists() else [] for name, f in files.items()}
        train = [e for e in rows[TRAIN_FILE] if e.labeled]
        held = [e for e in rows[EVAL_FILE] if e.labeled]
        unlabeled = [e for rs in rows.values() for e in rs if not e.labeled]
        return SiteData(train, held, unlabeled)
    rows = read_jsonl(path)
    return SiteData([e for e in rows if e.labeled], [], [e for e in rows if not e.labeled])


def load_model(site: Site) -> tuple[Any, Any, str]:
    """(model, tokenizer, base fingerprint) of the site's base model."""
    from common.models import fingerprint, load_base_model

    model, tok = load_base_model(site.model_path)
    return model, tok, fingerprint(site.model_path)


def to_compute_dtype(site: Site, model: Any) -> str:
    """Cast ``model`` (in place) to the dtype this site trains and generates in, and name it.

    Call it only after every z of the request is computed: z is always taken from the float32
    weights (``common.models.compute_dtype`` says why), and a bf16 cast cannot be undone."""
    from common.models import cast_parameters, compute_dtype, model_device

    dtype = compute_dtype(site.compute_dtype, model_device(model))
    cast_parameters(model, dtype)
    return str(dtype).removeprefix("torch.")


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
