"""The run config of one ServerApp run, parsed once into a frozen, typed :class:`Settings`.

Every run-config key lives in ``pyproject.toml``'s ``[tool.flwr.app.config]`` (Flower refuses a
``--run-config`` key that is not there, and fills in the defaults from there). The field defaults
below mirror that table one to one; ``tests/unit/test_federation.py`` asserts that they match, so a
default is changed in the pyproject and here, nowhere else. Keys the ServerApp does not read
(``sim-*``: they configure the simulated sites) are listed in :data:`SITE_ONLY_KEYS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.adapters.normalise import DEFAULT_UPDATE_NORM, check_update_norm
from common.families import DEFAULT_FAMILY, family_names
from server.nearness import DEFAULT_FAR_RATIO, check_far_ratio

MODES = ("enroll", "compose", "evaluate", "whoami")
REGISTRY_ENV = "RPE_REGISTRY"
ALLOWLIST_ENV = "RPE_ALLOWLIST"
#: run-config keys read by the simulated sites (``client/site.py``), not by the ServerApp
SITE_ONLY_KEYS = frozenset(
    {
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
    }
)


class SettingsError(ValueError):
    """The run config cannot describe a run (unknown mode, no registry, a value of the wrong type)."""


def _check_family_options(task: str, text: str) -> None:
    """Refuse, before any site is asked, a ``family-options`` setting the family does not take
    (the site checks the same again: ``client.site.family_options``)."""
    import json

    from common.families import get_family
    from common.protocol.checks import parse_options
    from common.protocol.wire import WireError

    try:
        parse_options(text, "run config", "family-options")
    except WireError as exc:
        raise SettingsError(str(exc)) from None
    family = get_family(task)
    takes = ", ".join(sorted(family.option_keys)) or "none"
    for name, value in json.loads(text).items():
        accepted = family.option_keys.get(name)
        if accepted is None:
            raise SettingsError(
                f"run config family-options: the {task} family takes no option {name!r} (it takes: {takes})"
            )
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            raise SettingsError(
                f"run config family-options: option {name!r} of the {task} family: {value!r} is not {accepted}"
            )


def _check_strategies(s: Settings) -> None:
    """Refuse, before any site is asked, a ``strategy`` / ``eval-strategies`` name no strategy has
    (``rpe fed run`` refuses it earlier still, with the closest match: ``deploy/fed.py``)."""
    from server.strategies import STRATEGIES

    for key, names in (("strategy", (s.strategy,)), ("eval-strategies", s.eval_strategies)):
        for name in names:
            if name.replace("_", "-") not in STRATEGIES:
                raise SettingsError(f"run config {key}={name!r}; expected one of: {', '.join(STRATEGIES)}")


def _csv(value: Any) -> tuple[str, ...]:
    return tuple(s.strip() for s in str(value or "").split(",") if s.strip())


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _options(value: Any) -> str:
    """``family-options``: a JSON object, or a ``key=value,key=value`` list (values as JSON when they
    parse, else text); returned as the canonical JSON text the wire's ``options`` key carries."""
    import json

    text = str(value or "").strip()
    if not text:
        return ""
    if text.startswith("{"):
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object")
    else:
        obj = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, sep, raw = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{item!r} is not key=value")
            try:
                obj[name.strip()] = json.loads(raw.strip())
            except ValueError:
                obj[name.strip()] = raw.strip()
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _key(name: str, parse: Callable[[Any], Any], default: Any) -> Any:
    """A field read from run-config key ``name`` with ``parse``; ``default`` as in the pyproject."""
    return field(default=default, metadata={"key": name, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """One run's settings (run-config key in each field's metadata; defaults = the pyproject's)."""

    mode: str = _key("mode", str, "enroll")
    registry_dir: str = _key("registry-dir", str, "")
    base_model: str = _key("base-model", str, "")
    chroma: str = _key("chroma", str, "embedded")
    sites: tuple[str, ...] = _key("sites", _csv, ())
    #: the task family (``common.families``); its default is the first family this system had
    task: str = _key("task", str, DEFAULT_FAMILY)
    #: the family's own request settings (``Family.option_keys``), as the wire's ``options`` JSON text
    family_options: str = _key("family-options", _options, "")
    steps: int = _key("steps", int, 40)
    lr: float = _key("lr", float, 1e-3)
    batch_size: int = _key("batch-size", int, 4)
    max_length: int = _key("max-length", int, 192)
    seed: int = _key("seed", int, 0)
    lora_r: int = _key("lora-r", int, 8)
    lora_alpha: float = _key("lora-alpha", float, 16.0)
    lora_targets: str = _key("lora-targets", str, "q_proj,v_proj")
    lora_dropout: float = _key("lora-dropout", float, 0.0)
    embed_layer: int = _key("embed-layer", int, -1)
    max_examples: int = _key("max-examples", int, 0)
    keep_previous: bool = _key("keep-previous", _bool, False)
    require_signatures: bool = _key("require-signatures", _bool, True)
    allowlist: str = _key("allowlist", str, "")
    blob_key_file: str = _key("blob-key-file", str, "")
    targets: tuple[str, ...] = _key("target", _csv, ())
    strategy: str = _key("strategy", str, "sim")
    k: int = _key("k", int, 3)
    include_own: bool = _key("include-own", _bool, False)
    one_per_site: bool = _key("one-per-site", _bool, True)
    max_rank: int = _key("max-rank", int, 0)
    lam1: float = _key("lam1", float, 0.0)
    lam2: float = _key("lam2", float, 0.0)
    max_l1: float = _key("max-l1", float, 0.0)
    far_ratio: float = _key("far-ratio", check_far_ratio, DEFAULT_FAR_RATIO)  # server/nearness.py
    #: compose / evaluate: rescale each retrieved adapter's update before weighting (common/adapters/normalise.py)
    update_norm: str = _key("update-norm", lambda v: check_update_norm(v, ""), DEFAULT_UPDATE_NORM)
    evaluate: bool = _key("evaluate", _bool, True)
    max_eval: int = _key("max-eval", int, 0)
    eval_strategies: tuple[str, ...] = _key("eval-strategies", _csv, ("sim", "lin", "lin-l1"))
    timeout_train: float = _key("timeout-train", float, 1800.0)
    timeout_query: float = _key("timeout-query", float, 300.0)

    def __post_init__(self) -> None:
        # tuples, whatever a caller passed (tests build Settings(sites=["a"]) directly)
        for name in ("sites", "targets", "eval_strategies"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
        """Parse the run config (missing keys take the defaults); fill the registry and allow-list
        from the SuperLink's environment when the run config leaves them empty."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.metadata["key"]
            raw = rc.get(key)
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"run config {key}={raw!r}: {exc}") from None
        s = cls(**values)
        if s.mode not in MODES:
            raise SettingsError(f"run config mode={s.mode!r}; expected one of {MODES}")
        if s.task not in family_names():
            raise SettingsError(f"run config task={s.task!r}; known task families: {', '.join(family_names())}")
        if s.family_options:
            _check_family_options(s.task, s.family_options)
        _check_strategies(s)
        registry_dir = s.registry_dir or env.get(REGISTRY_ENV, "")
        if not registry_dir:
            raise SettingsError(f"no registry: set run config 'registry-dir' or ${REGISTRY_ENV} on the SuperLink")
        allowlist = s.allowlist or env.get(ALLOWLIST_ENV, "") or str(Path(registry_dir) / "allowlist.json")
        return replace(s, registry_dir=registry_dir, allowlist=allowlist)

    def options_config(self) -> dict[str, str]:
        """``{"options": ...}`` for a request that names the task, or nothing when none are set."""
        return {"options": self.family_options} if self.family_options else {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{run-config key: default}`` in the pyproject's spelling (lists as comma-separated text)."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            out[f.metadata["key"]] = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        return out

    def as_report(self) -> dict[str, Any]:
        """The settings as the run report records them (field names, lists as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def strategy_params(self, strategy: str) -> dict[str, float]:
        """Only the parameter the strategy takes, and only when set (0 = the strategy's default)."""
        key = strategy.replace("_", "-")
        if key == "sim" and self.lam1:
            return {"lam1": self.lam1}
        params: dict[str, float] = {}
        if key == "lin-l1" and self.lam2:
            params["lam2"] = self.lam2
        if key in ("lin", "lin-l1") and self.max_l1:
            params["max_l1"] = self.max_l1
        return params
