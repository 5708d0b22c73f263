"""The ``Family`` protocol: everything that depends on *what* a task family's data and model are.

A task family (radiology reports, segmentation, the next one) is one folder under
``common/families/`` holding one object that implements :class:`Family`, found by name through the
table in ``common/families/__init__.py``. Registry, strategies, composition, the site handlers
(``client/handlers.py``), bootstrap, reporting, the console and the CLIs ask the family; none of
them names one. The family's name is the request's ``task``.

What stays outside a family, written once for every family: the wire vocabulary, signatures, the
site's release policy (z only over the whole data set, from an allowed layer; metrics over enough
held-out items), the Gaussian mechanism on z and its cache (keyed by the data's digest), the egress
log, the registry and composition. A family hands the site z *before* noise (the mean of the
per-example vectors, each clipped to ``clip_norm``), so one mechanism serves every family with one
example as one privacy unit.

This module and the table import no torch: ``query.whoami`` runs at every site in every run and
asks a family only for counts. A family module keeps torch (and its model code) behind imports
inside its methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class FamilyError(ValueError):
    """A family cannot do what was asked: unknown name, bad option, data it cannot read."""


class CommandError(FamilyError):
    """A family's site command cannot run as asked (missing directory, unreadable adapter or data)."""


@dataclass(frozen=True)
class RegistrySpec:
    """Where a family's registry lives under the coordinator's registry root and what its z is.

    ``subdir`` "" is the root itself (the report family, for registries made before families had
    folders); any other family keeps its own registry (own z dim, representation and index) in
    ``<root>/<subdir>/``, so a query can never mix two families' vectors."""

    subdir: str
    representation: str


@dataclass(frozen=True)
class SiteInputs:
    """What a family may know about a site: where its data, base model and working files are, and
    the family's own node-config keys (``Family.node_config_keys``). Built by the site from its node
    config (``client/site.py``); a family never sees the site's keys or policy."""

    site: str
    data_path: Path
    model_path: str
    work_dir: Path
    options: Mapping[str, str] = field(default_factory=dict)

    def option(self, key: str, default: str = "") -> str:
        """A node-config option of the family, or ``default`` when unset or empty."""
        return str(self.options.get(key, default) or default)


@dataclass(frozen=True)
class DataCounts:
    """What ``query.whoami`` says about a site's data: counts and group names, never data."""

    groups: list[str]
    n_examples: int
    n_labeled: int
    n_unlabeled: int
    n_eval: int
    ok: bool


@dataclass
class DataCheck:
    """What ``rpe data check`` says about one site folder for one family (no model, no torch).

    ``used``: how many examples each split would use (``train``, ``eval``, ``unlabeled``);
    ``lines``: what would be used, for a person (files, columns, slices, label convention);
    ``problems``: each names the file (and row or slice), what was expected and what to do; any
    problem makes ``ok`` false; ``warnings``: usable but suspicious (a mask that is mostly
    foreground, a column never filled)."""

    family: str
    path: str
    used: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class SiteDataset:
    """A site's examples as the family reads them (items are the family's own type).

    ``train``: labeled, for training; ``eval``: labeled, held out for scores; ``unlabeled``: data
    without labels (z only). ``groups``: the group names, most common first."""

    train: list[Any]
    eval: list[Any]
    unlabeled: list[Any]
    groups: list[str] = field(default_factory=list)
    #: the family's own view of the whole set (e.g. a ``SegSite``), for training that needs it
    source: Any = None

    @property
    def all(self) -> list[Any]:
        return [*self.train, *self.eval, *self.unlabeled]


@dataclass
class Base:
    """A loaded base model: the module, its fingerprint and whatever else the family needs with it
    (a tokenizer)."""

    model: Any
    fingerprint: str
    extra: Any = None


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD as the site's policy asks for it (``dp-noise-multiplier`` > 0)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float


@dataclass(frozen=True)
class TrainPlan:
    """What a request (and the site's policy) asks of training; ``options`` is the family's own part."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    dp: DPSettings | None = None
    options: Any = None


@dataclass
class TrainResult:
    """A trained adapter, its training statistics (``wire.TRAIN_STATS_KEYS``) and, with DP-SGD, the
    accountant's record (``common.privacy.dp_sgd_stats``)."""

    adapter: Any
    stats: dict[str, Any]
    dp: dict[str, Any] | None = None


@dataclass(frozen=True)
class RegistryBase:
    """What the coordinator needs to create a family's registry from its base model."""

    fingerprint: str
    module_shapes: dict[str, tuple[int, int]]
    embedding_dim: int
    base_name: str


@dataclass(frozen=True)
class DemoSite:
    """One site of a family's demo federation: its id, its data (a path the site reads), the
    family's node-config keys and how the site loosens its release policy (small demo sets)."""

    site: str
    data_path: str
    node_config: dict[str, Any] = field(default_factory=dict)
    release: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoPlan:
    """A family's part of the demo federation (``deploy/demo.py``): its sites, their base model and
    the run-config settings of its runs (``mode``, ``task`` and the registry are the demo's)."""

    sites: list[DemoSite]
    model: str
    run_config: dict[str, Any]
    #: the site that receives one composition at the end of the demo (a delivery): a new site
    #: (enrols nothing) or, where its id is in ``sites``, an enrolled one (its own adapter left out)
    target: DemoSite | None = None
    #: the ``rpe`` command (argv after ``rpe``) to try the delivered adapter at the target with;
    #: ``{adapter}`` and ``{out}`` are filled in (the delivered directory, a fresh output path)
    try_argv: tuple[str, ...] = ()


@runtime_checkable
class Family(Protocol):
    """One task family. ``name`` is the request's ``task``; ``metric`` the score's name in results
    (``rouge_l``, ``dice``), ``metric_title`` how a table heads it."""

    name: str
    metric: str
    metric_title: str
    registry: RegistrySpec
    #: what one example (one privacy unit) is called in messages: "report", "image"
    unit: str
    #: node-config keys a site of this family reads (passed on in ``SiteInputs.options``)
    node_config_keys: tuple[str, ...]
    #: the request settings of this family alone, ``{name: accepted types}``: they travel in ONE
    #: checked request key, ``options`` (a flat JSON object), so a new family never widens the
    #: wire vocabulary; ``train_plan`` finds them, checked, in ``config["options"]``
    option_keys: Mapping[str, tuple[type, ...]]
    #: whether the family trains with DP-SGD when a site's policy asks for it (else it refuses)
    supports_dp: bool
    #: the base model a site or command uses when none is named ("" = always name one)
    default_model: str
    #: ``"module:register"`` adding the family's site commands to ``rpe`` (``client/use.py``); "" for none
    commands: str
    #: ``"module:function"`` of the family's demo recipe, ``(workdir, profile, model) -> DemoPlan``
    #: (``deploy/demo.py`` runs every family that has one); "" for none
    demo: str

    # Optional (looked up with getattr, so older families still load):
    # ``check_data(site: SiteInputs) -> DataCheck`` for ``rpe data check``.

    def counts(self, site: SiteInputs) -> DataCounts:
        """The whoami counts (no torch, no model; a site whose data cannot be read says ``ok=False``)."""
        ...

    def load_data(self, site: SiteInputs) -> SiteDataset:
        """The site's examples."""
        ...

    def examples_from(self, path: Path) -> list[Any]:
        """The unlabeled examples in a file or folder a person names (``rpe embed``): what z is
        pooled over, as for an embedding query; no label is read."""
        ...

    def z_examples(self, data: SiteDataset, enrolment: bool) -> list[Any]:
        """What z is pooled over: at enrolment (with the adapter) and for an embedding query (the
        unlabeled view: no labels are read for it)."""
        ...

    def data_digest(self, examples: Sequence[Any]) -> str:
        """A digest of exactly the inputs z is pooled over (the released-z cache's key)."""
        ...

    def z_states(self, site: SiteInputs) -> int:
        """How many hidden states z may be pooled from, without loading the model (1: its output only)."""
        ...

    def base_fingerprint(self, site: SiteInputs) -> str:
        """The fingerprint of the site's base model (cached on disk; cheaper than loading it)."""
        ...

    def peft_base(self, site: SiteInputs) -> str:
        """What a PEFT directory the site writes names as its base model (``base_model_name_or_path``)."""
        ...

    def load_base(self, site: SiteInputs) -> Base:
        """The site's base model, float32 (z is always taken from float32 weights)."""
        ...

    def to_compute(self, base: Base, dtype: str) -> str:
        """Cast the model (in place) to the site's compute dtype (``common.models.compute_dtype``;
        ``dtype`` is the node config's ``compute-dtype``) where the family trains and scores in it;
        the dtype used. Called only after every z of the request is taken."""
        ...

    def train_plan(self, config: Mapping[str, Any], dp: DPSettings | None) -> TrainPlan:
        """The request's training settings in this family's terms (its defaults where unset);
        ``config["options"]`` holds the family's own settings (``option_keys``), already checked."""
        ...

    def train(self, base: Base, site: SiteInputs, data: SiteDataset, plan: TrainPlan) -> TrainResult:
        """A LoRA on ``data.train``."""
        ...

    def embed(self, base: Base, site: SiteInputs, examples: Sequence[Any], layer: int, clip_norm: float | None) -> Any:
        """z before noise over ``examples`` (``common.embedding.EmbeddingResult``): the mean of the
        per-example vectors, each clipped to ``clip_norm`` when given; ``n_tokens`` is what the
        Gaussian mechanism divides its noise by; ``example_sums`` each example's vector before
        clipping (it stays at the site: ``rpe privacy z-norms`` reads it to choose ``z-clip``)."""
        ...

    def score(
        self, base: Base, site: SiteInputs, examples: Sequence[Any], adapters: Sequence[Any]
    ) -> list[dict[str, float]]:
        """Scores of each adapter (None: the base model) on held-out ``examples``: numbers only,
        ``metric`` among them, plus ``n``."""
        ...

    def describe(self, data: SiteDataset) -> dict[str, str]:
        """``modality`` and ``group`` of the enrolment record."""
        ...

    def registry_base(self, model: str) -> RegistryBase:
        """Fingerprint, module shapes and z dim of base model ``model`` (the coordinator's copy)."""
        ...
