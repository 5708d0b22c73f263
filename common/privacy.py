"""Differential privacy for what leaves a site: the Gaussian mechanism on z, and accounting.

Two things a site may release about its private reports are protected here or in
``common.families.report.training``:

* the **adapter** (DP-SGD in ``train_lora``: Poisson sampling at rate q, per-example gradient
  clipping to C, Gaussian noise of standard deviation σ·C on every step's sum);
* the **site embedding z** (this module): z is the mean of a hidden layer over all tokens of all
  examples, ``z = Σ_i s_i / T`` with ``s_i`` example i's sum of token vectors and T the total
  token count. With ``z-clip`` = C each ``s_i`` is scaled to L2 norm at most C, and Gaussian
  noise of standard deviation σ·C is added to the sum before the division:
  ``z = (Σ_i clip_C(s_i) + N(0, σ²C² I)) / T``. Adding or removing one report changes the
  clipped sum by at most C in L2, so this is the Gaussian mechanism with noise multiplier σ.
  When no example is clipped (C above every example's norm) the noiseless part equals the
  ordinary z exactly, so private and non-private sites stay comparable.

Accounting. One z release alone is reported with the *analytic* Gaussian mechanism (Balle &
Wang, ICML 2018, Theorem 8), which is exact: the smallest ε with
``Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ) ≤ δ``. Several releases of the same data (an enrolment
sends a DP-SGD adapter *and* z; every embedding query sends another z) compose
(``composed_epsilon``): z releases alone exactly, as one Gaussian mechanism; together with DP-SGD
through Rényi DP (Opacus' RDP accountant, add/remove-one adjacency, the one DP-SGD uses). That is
what ``epsilon_total`` reports, what ``spent_from_egress`` adds up over a site's whole egress log
and what ``privacy-budget`` caps.

Counts: ``sample_count`` leaves rounded down to a multiple of the site's minimum set size and
``token_count`` as 0 (``client/history.py``, which also refuses a release whose difference from an
earlier one covers fewer items than the minimum set: differencing over time). A z re-sent from an
earlier release is a repeat (no new cost); every new release counts.

Not covered, and said so in the README: the noise comes from numpy's PCG64 seeded from OS entropy
(``secrets``), not a floating-point-safe discrete sampler (Mironov, CCS 2012).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.protocol.egress import read_egress as read_egress_lines

DEFAULT_DELTA = 1e-5
#: the node-config keys of a site's privacy policy (all optional, all off by default)
POLICY_KEYS = (
    "dp-noise-multiplier",
    "dp-max-grad-norm",
    "dp-delta",
    "z-clip",
    "z-noise-multiplier",
    "z-epsilon",
    "z-delta",
    "privacy-budget",
)


class PrivacyConfigError(ValueError):
    """A site's privacy settings are inconsistent or out of range."""


class PrivacyBudgetError(PrivacyConfigError):
    """A release would take the site past its ``privacy-budget`` (or is not private while one is set)."""


def check_policy(src: Mapping[str, Any]) -> dict[str, float]:
    """The privacy keys of a node config (others ignored) as numbers, checked for consistency.

    The one check for a site's policy: the ClientApp applies it to its node config and
    ``deploy.launch`` to ``--privacy`` flags before starting a SuperNode.
    """
    policy: dict[str, float] = {}
    for k in (*POLICY_KEYS, "z-noise-sigma"):  # the legacy key only to refuse it with the fix
        if k in src:
            try:
                policy[k] = float(src[k])
            except (TypeError, ValueError):
                raise PrivacyConfigError(f"node config {k!r} must be a number; got {src[k]!r}") from None
    ZMechanism.from_policy(policy)
    return policy


# -- the analytic Gaussian mechanism -------------------------------------------------------------
def _log_ndtr(x: float) -> float:
    from scipy.special import log_ndtr

    return float(log_ndtr(x))


def gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """δ(ε) of the Gaussian mechanism with noise std = ``noise_multiplier`` × L2 sensitivity."""
    s = float(noise_multiplier)
    a, b = 1.0 / (2.0 * s), epsilon * s
    first = math.exp(_log_ndtr(a - b))
    second = math.exp(epsilon + _log_ndtr(-a - b)) if epsilon + _log_ndtr(-a - b) < 700 else math.inf
    return max(0.0, first - second)


def _smallest(ok: Any, lo: float, hi: float, limit: float = 1e6) -> float:
    """The smallest x in [lo, ∞) with ``ok(x)`` for a monotone predicate (doubling, then bisection)."""
    while not ok(hi):
        lo, hi = hi, hi * 2.0
        if hi > limit:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi


def gaussian_epsilon(noise_multiplier: float, delta: float = DEFAULT_DELTA) -> float:
    """The exact (smallest) ε at which the Gaussian mechanism is (ε, δ)-DP (Balle & Wang 2018)."""
    _check_noise(noise_multiplier, "noise multiplier")
    _check_delta(delta)
    if gaussian_delta(0.0, noise_multiplier) <= delta:
        return 0.0
    return _smallest(lambda eps: gaussian_delta(eps, noise_multiplier) <= delta, 0.0, 1.0)


def calibrate_gaussian(epsilon: float, delta: float = DEFAULT_DELTA) -> float:
    """The smallest noise multiplier σ that makes one Gaussian release (ε, δ)-DP."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyConfigError(f"target epsilon must be a positive finite number; got {epsilon!r}")
    _check_delta(delta)
    return _smallest(lambda sigma: gaussian_delta(epsilon, sigma) <= delta, 1e-3, 1.0)


def _check_noise(value: float, what: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise PrivacyConfigError(f"{what} must be a positive finite number; got {value!r}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise PrivacyConfigError(f"delta must be in (0, 1), typically 1e-5 or below 1/n; got {delta!r}")


# -- composition -----------------------------------------------------------------------------------
#: one Gaussian mechanism, possibly subsampled and repeated: (noise multiplier, sample rate, steps)
Mechanism = tuple[float, float, int]


def composed_epsilon(mechanisms: Sequence[Mechanism], delta: float = DEFAULT_DELTA) -> float:
    """ε of running every mechanism on the same data.

    Releases without subsampling (every z) compose exactly: n Gaussian releases with noise
    multipliers σ_i are one Gaussian release with σ = (Σ 1/σ_i²)^(-1/2) (Dong, Roth & Su 2019,
    Gaussian differential privacy), whose ε is exact. Anything with DP-SGD's subsampling goes through
    Rényi DP (Opacus' RDP accountant, the one DP-SGD uses).
    """
    from opacus.accountants import RDPAccountant

    _check_delta(delta)
    if not mechanisms:
        return 0.0
    if all(q >= 1.0 for _, q, _ in mechanisms):
        return gaussian_epsilon(sum(n / s**2 for s, _, n in mechanisms) ** -0.5, delta)
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in mechanisms]
    return float(accountant.get_epsilon(delta=delta))


def dp_sgd_stats(
    noise_multiplier: float, max_grad_norm: float, delta: float, sample_rate: float, steps: int
) -> dict[str, Any]:
    """DP-SGD's accounting (the ``dp_*`` stats of ``train_lora``), known before training starts."""
    return {
        "dp_epsilon": composed_epsilon([(noise_multiplier, sample_rate, steps)], delta),
        "dp_delta": delta,
        "dp_noise_multiplier": noise_multiplier,
        "dp_max_grad_norm": max_grad_norm,
        "dp_sample_rate": sample_rate,
        "dp_steps": steps,
    }


# -- the mechanism on z ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZMechanism:
    """Per-example L2 clipping of z's token sums to ``clip`` plus N(0, (σ·clip)²) on their sum."""

    clip: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        _check_noise(self.clip, "z-clip")
        _check_noise(self.noise_multiplier, "z noise multiplier")
        _check_delta(self.delta)

    @property
    def epsilon(self) -> float:
        return gaussian_epsilon(self.noise_multiplier, self.delta)

    @classmethod
    def from_policy(cls, policy: Mapping[str, float]) -> ZMechanism | None:
        """The mechanism a site's node config asks for, or None when z is sent without noise.

        ``z-clip`` (required with noise) and exactly one of ``z-noise-multiplier`` (σ) or
        ``z-epsilon`` (target ε: σ is calibrated); ``z-delta`` defaults to ``dp-delta`` or 1e-5.
        """
        if "z-noise-sigma" in policy:
            raise PrivacyConfigError(
                "node config 'z-noise-sigma' is no longer supported: set 'z-clip' (per-report L2 bound "
                "of z's token sums) and 'z-noise-multiplier' (noise std / z-clip) or 'z-epsilon'"
            )
        sigma, eps = policy.get("z-noise-multiplier", 0.0), policy.get("z-epsilon", 0.0)
        clip = policy.get("z-clip", 0.0)
        delta = policy.get("z-delta", policy.get("dp-delta", DEFAULT_DELTA))
        if sigma and eps:
            raise PrivacyConfigError(
                "node config sets both 'z-noise-multiplier' and 'z-epsilon'; keep one "
                "(z-epsilon calibrates the noise multiplier for you)"
            )
        if not sigma and not eps:
            if clip:
                raise PrivacyConfigError(
                    "node config sets 'z-clip' without noise, which protects nothing: add "
                    "'z-noise-multiplier' (e.g. 1.0) or 'z-epsilon' (e.g. 4.0), or remove 'z-clip'"
                )
            return None
        if not clip:
            raise PrivacyConfigError(
                "the Gaussian mechanism on z needs 'z-clip', the L2 bound on one report's sum of token "
                "vectors (its scale: tokens per report x token-vector norm; `rpe privacy z-norms` prints "
                "the distribution on your data)"
            )
        if eps:
            sigma = calibrate_gaussian(eps, delta)
        return cls(clip=clip, noise_multiplier=sigma, delta=delta)

    def apply(self, z: np.ndarray, n_tokens: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Add the noise to an already clipped mean ``z`` over ``n_tokens`` tokens (float32 out).

        Noise std on the sum is σ·clip, hence σ·clip / n_tokens on the mean. The default generator
        is seeded from OS entropy: a reproducible seed would let anyone who knows it remove the noise.
        """
        if n_tokens <= 0:
            raise ValueError("n_tokens must be positive")
        rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        noise = rng.normal(0.0, self.noise_multiplier * self.clip / n_tokens, size=z.shape)
        return (z.astype(np.float64) + noise).astype(np.float32)

    def record(self) -> dict[str, Any]:
        return {
            "z_mechanism": "gaussian",
            "z_clip": self.clip,
            "z_noise_multiplier": self.noise_multiplier,
            "z_epsilon": self.epsilon,
            "z_delta": self.delta,
        }


def release_record(
    dp_stats: Mapping[str, Any] | None, z_mech: ZMechanism | None, adapter_sent: bool, z_repeat: bool = False
) -> dict[str, Any]:
    """The ``privacy`` metadata of one release: what protected the adapter and z, and the ε spent.

    ``epsilon``/``delta`` are DP-SGD's (from ``train_lora``'s stats); ``z_epsilon``/``z_delta``
    the z mechanism's alone; ``epsilon_total`` (at ``delta_total``) covers the whole release and is
    present only when every part of it is private (a non-private adapter or z has no finite ε).
    ``z_repeat``: z is a noisy z this site already released (re-sent, so it costs nothing new).
    """
    out: dict[str, Any] = {"dp_sgd": dp_stats is not None}
    if dp_stats is not None:
        out.update(
            epsilon=dp_stats["dp_epsilon"],
            delta=dp_stats["dp_delta"],
            noise_multiplier=dp_stats["dp_noise_multiplier"],
            max_grad_norm=dp_stats["dp_max_grad_norm"],
            sample_rate=dp_stats["dp_sample_rate"],
            steps=int(dp_stats["dp_steps"]),
        )
    if z_mech is not None:
        out.update(z_mech.record())
        if z_repeat:
            out["z_repeat"] = True
    return with_total(out, adapter_sent)


def with_total(record: dict[str, Any], adapter_sent: bool) -> dict[str, Any]:
    """``record`` plus ``epsilon_total``/``delta_total`` for the whole release when it is all private."""
    mechs = mechanisms_of(record, adapter_sent)
    if mechs is None:
        return record
    delta = max([float(record.get("delta", 0.0) or 0.0), float(record.get("z_delta", 0.0) or 0.0)])
    return {**record, "epsilon_total": composed_epsilon(mechs, delta), "delta_total": delta}  # 0: a repeated z


def mechanisms_of(record: Mapping[str, Any], adapter_sent: bool) -> list[Mechanism] | None:
    """The Gaussian mechanisms behind one release's privacy record, or None if any part is not private."""
    mechs: list[Mechanism] = []
    if adapter_sent:
        if not record.get("dp_sgd"):
            return None
        mechs.append((float(record["noise_multiplier"]), float(record["sample_rate"]), int(record["steps"])))
    if record.get("z_mechanism") != "gaussian":
        return None
    if not record.get("z_repeat"):  # a repeat re-sends an earlier noisy z: post-processing, no new cost
        mechs.append((float(record["z_noise_multiplier"]), 1.0, 1))
    return mechs


# -- what a site has spent, from its egress log ------------------------------------------------------
@dataclass
class Spent:
    """The privacy a site spent over the releases in its egress log (``rpe privacy spent``)."""

    releases: list[dict[str, Any]]
    epsilon: float  # inf when any release was not private
    delta: float
    non_private: list[str]

    def summary(self) -> str:
        lines = [f"{len(self.releases)} release(s) of data-derived values"]
        for r in self.releases:
            eps = "not private" if r["epsilon"] is None else f"ε={r['epsilon']:.3f}"
            lines.append(f"  {r['ts']}  {r['message_type']:<12} {r['what']:<12} {eps}")
        if self.non_private:
            lines.append(
                f"total: ε = ∞ — {len(self.non_private)} release(s) without differential privacy "
                f"(first: {self.non_private[0]})"
            )
        else:
            lines.append(
                f"total: ε = {self.epsilon:.3f} at δ = {self.delta:g} (RDP composition of every "
                "release; assumes all releases are about the same reports)"
            )
        return "\n".join(lines)


def _meta_of(line: Mapping[str, Any]) -> dict[str, Any] | None:
    for rec in line.get("records", []):
        if rec.get("name") in ("meta", "metadata"):  # the ClientApp's replies carry "meta"
            return {i["key"]: i.get("value") for i in rec.get("items", [])}
    return None


def _releases(lines: Iterable[Mapping[str, Any]]) -> Iterator[tuple[dict[str, Any], list[Mechanism] | None]]:
    """Each data-derived release in an egress log: (summary, its mechanisms or None if not private).

    Metric replies (scores of a delivered adapter on the site's held-out data) are data-derived
    too and are never noised, so they count as not private.
    """
    for line in lines:
        names = {r.get("name") for r in line.get("records", [])}
        kind = line.get("message_type", "?")
        base = {"ts": line.get("ts"), "message_type": kind}
        if "embedding" in names:
            meta = _meta_of(line) or {}
            try:
                record = json.loads(meta.get("privacy") or "{}")
            except (TypeError, ValueError):
                record = {}
            adapter = "adapter" in names
            mechs = mechanisms_of(record, adapter)
            eps = None if mechs is None else with_total(record, adapter).get("epsilon_total")
            yield {**base, "what": "adapter+z" if adapter else "z", "epsilon": eps}, mechs
        elif any(r.get("name") == "metrics" and r.get("items") for r in line.get("records", [])):
            yield {**base, "what": "metrics", "epsilon": None}, None


def spent_from_egress(lines: Iterable[Mapping[str, Any]], delta: float = DEFAULT_DELTA) -> Spent:
    """Compose every data-derived release in a site's egress log (adapters, z vectors, metrics)."""
    _check_delta(delta)
    releases: list[dict[str, Any]] = []
    mechs: list[Mechanism] = []
    non_private: list[str] = []
    for summary, got in _releases(lines):
        releases.append(summary)
        if got is None:
            where = f"{summary['ts']} {summary['message_type']}"
            non_private.append(where + (" (metrics on held-out data)" if summary["what"] == "metrics" else ""))
        else:
            mechs.extend(got)
    eps_total = math.inf if non_private else composed_epsilon(mechs, delta)
    return Spent(releases, eps_total, delta, non_private)


def check_budget(
    budget: float, past: Iterable[Mapping[str, Any]], record: Mapping[str, Any], adapter_sent: bool
) -> float:
    """The site's ε after this release, composed with every *private* release already in its egress
    log; raise ``PrivacyBudgetError`` if that exceeds ``budget`` or if this release is not private.

    Non-private releases made before the budget was set are not counted here (their ε is
    unbounded; ``rpe privacy spent`` reports them).
    """
    mechs = mechanisms_of(record, adapter_sent)
    if mechs is None:
        what = (
            "the adapter is not trained with DP-SGD"
            if adapter_sent and not record.get("dp_sgd")
            else "z is sent without the Gaussian mechanism"
        )
        raise PrivacyBudgetError(
            f"node config privacy-budget is set but this release would not be differentially private ({what}); "
            "set dp-noise-multiplier and z-clip with z-epsilon or z-noise-multiplier"
        )
    delta = float(record.get("delta_total") or DEFAULT_DELTA)
    before = [m for _, got in _releases(past) if got is not None for m in got]
    spent_before = composed_epsilon(before, delta)
    after = composed_epsilon(before + mechs, delta)
    if after > budget:
        raise PrivacyBudgetError(
            f"privacy budget exhausted: this release would bring the site to ε = {after:.3f} at δ = {delta:g} "
            f"(spent so far {spent_before:.3f}, budget {budget:g}); nothing was sent. Raise privacy-budget in "
            "the node config only if the site's privacy officer agrees"
        )
    return after


def read_egress(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a site's egress log, for budget accounting: ``common.protocol.egress.read_egress``, but
    any unreadable line is an error (spending must never be under-counted)."""
    entries, bad = read_egress_lines(path)
    if bad:
        raise ValueError(f"{path}:{bad[0]} is not an egress line; is this an rpe egress log?")
    return [entry for _, entry in entries]
