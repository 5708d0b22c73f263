"""The site's release policy: what may leave it is decided here, from its own node config, never by the request.

An attack this closes (issue 10): asking ``query.embed`` with ``max_examples=1, 2, 3`` and
``embed_layer=0`` (the token-embedding layer) and differencing the replies with their exact token
counts recovered whole reports. So:

- z is computed over the site's whole eligible data set only, and only when it holds at least
  ``z-min-examples`` examples; a request for a subset (``max_examples`` smaller than the set) is
  refused, not silently widened, so the coordinator learns it asked for something it may not have;
- the representation layer must be one of the site's ``z-layers`` (default: the last layer only),
  compared after normalisation (``-1`` and ``n_states - 1`` are the same layer, one cache key);
- held-out metrics are released only over at least ``metrics-min-reports`` reports.

Every refusal is a ``ReleaseRefused`` with a stable ``code`` that the ClientApp writes to its egress
log and returns as a typed failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POLICY_KEYS = ("z-min-examples", "z-layers", "metrics-min-reports")
DEFAULT_MIN_EXAMPLES = 10
DEFAULT_MIN_METRIC_REPORTS = 10


class ReleaseRefused(Exception):
    """The site's policy forbids this release; nothing was computed or sent."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ReleasePolicyError(ValueError):
    """The site's own node config holds an invalid release-policy value."""


def _int(cfg: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ReleasePolicyError(f"node config {key}={value!r}: expected an integer >= {minimum}")
    try:
        as_float = float(str(value).strip())  # TOML / launch may spell 10 as 10.0
        number = int(as_float)
        if number != as_float:
            raise ValueError(value)
    except (ValueError, OverflowError):
        raise ReleasePolicyError(f"node config {key}={value!r}: expected an integer >= {minimum}") from None
    if number < minimum:
        raise ReleasePolicyError(f"node config {key}={number}: must be >= {minimum}")
    return number


@dataclass(frozen=True)
class ReleasePolicy:
    """What this site releases. Defaults are the safe choice; a site may only loosen them in its own config."""

    min_examples: int = DEFAULT_MIN_EXAMPLES
    layers: tuple[int, ...] = (-1,)
    min_metric_reports: int = DEFAULT_MIN_METRIC_REPORTS

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> ReleasePolicy:
        raw = str(cfg.get("z-layers", "-1"))
        try:
            layers = tuple(int(x) for x in raw.replace(";", ",").split(",") if x.strip())
        except ValueError:
            raise ReleasePolicyError(
                f"node config z-layers={raw!r}: expected comma-separated layer indices, e.g. '-1' or '-1,15'"
            ) from None
        if not layers:
            raise ReleasePolicyError("node config z-layers is empty; name at least one layer (e.g. '-1')")
        return cls(
            min_examples=_int(cfg, "z-min-examples", DEFAULT_MIN_EXAMPLES, 1),
            layers=layers,
            min_metric_reports=_int(cfg, "metrics-min-reports", DEFAULT_MIN_METRIC_REPORTS, 1),
        )

    def embedding_layer(self, requested: int, n_states: int) -> int:
        """The normalised layer index (0 ≤ layer < n_states) if the site allows it, else ``ReleaseRefused``."""
        if isinstance(requested, bool) or not isinstance(requested, int) or not -n_states <= requested < n_states:
            raise ReleaseRefused(
                "layer-out-of-range",
                f"embedding layer {requested!r} does not exist (the model has {n_states} hidden states)",
            )
        layer = requested % n_states
        allowed = sorted({x % n_states for x in self.layers if -n_states <= x < n_states})
        if layer not in allowed:
            raise ReleaseRefused(
                "layer-not-allowed",
                f"embedding layer {requested} (= {layer}) is not in this "
                f"site's z-layers {allowed}; the site releases z only from those layers",
            )
        return layer

    def embedding_examples(self, n_eligible: int, requested_max: int = 0) -> int:
        """How many examples z is pooled over: always the whole eligible set, and at least ``min_examples``."""
        if isinstance(requested_max, bool) or not isinstance(requested_max, int) or requested_max < 0:
            raise ReleaseRefused("bad-request", f"max_examples={requested_max!r} must be a non-negative integer")
        if requested_max and requested_max < n_eligible:
            raise ReleaseRefused(
                "subset-refused",
                f"a z over {requested_max} of the site's {n_eligible} examples "
                "was requested; this site releases z only over its whole eligible data set",
            )
        if n_eligible < self.min_examples:
            raise ReleaseRefused(
                "too-few-examples",
                f"the site holds {n_eligible} eligible examples; its policy "
                f"releases z only over at least {self.min_examples} (z-min-examples)",
            )
        return n_eligible

    def metrics(self, n_reports: int) -> None:
        """Allow held-out metrics over ``n_reports`` reports, or raise ``ReleaseRefused``."""
        if n_reports < self.min_metric_reports:
            raise ReleaseRefused(
                "too-few-reports",
                f"metrics over {n_reports} held-out reports were requested; "
                f"this site releases metrics only over at least {self.min_metric_reports} "
                "(metrics-min-reports)",
            )
