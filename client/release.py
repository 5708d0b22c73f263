"""What the site's privacy policy does to a release, for every family alike: the layer z may come
from, the privacy budget checked before anything is computed, the Gaussian mechanism on z, and the
cache that re-sends the *same* noisy z for the same data (repeated queries cannot average the noise
away). The cache is keyed by the family, the digest of exactly the inputs z is pooled over
(``Family.data_digest``), the base model, the layer and the mechanism."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.history import round_count
from client.policy import ReleaseRefused
from client.site import Site, SiteError
from common.families.base import Base, Family, FamilyError
from common.protocol import wire

#: a path as it appears in an error message: absolute (``/srv/x``), home-relative (``~/x``) or a
#: Windows drive path; not a slash inside a word (``q_proj/v_proj``, ``1/3``) nor a URL's ``//``
_PATH_RE = re.compile(r"(?<![\w.:/-])(?:~|[A-Za-z]:)?(?:[\\/][^\s'\"`,;:()\[\]{}<>|]+)+/?")
#: a quoted path (``'/srv/a b/x.jsonl'``, as an OSError shows it): spaces included, up to the quote
_QUOTED_PATH_RE = re.compile(r"""(['"])(?:~|[A-Za-z]:)?[\\/][^'"\n]*\1""")
#: what a local path is replaced by in the text of a reply
LOCAL_PATH = "<local path>"


def scrub_paths(text: str, site: Site | None = None) -> str:
    """``text`` with every local filesystem path replaced by ``<local path>``: the site's own
    paths (data, model, site directory, keys, the families' node-config paths) as configured,
    relative ones included, then anything shaped like an absolute path. Applied by the ClientApp's
    gate to the text of every error reply (``client/app.py``: ``_send``), whatever handler, family
    or exception built it: an error's text leaves the site; where the site keeps its files does
    not (issue 27 item 4). The SuperNode's own log keeps the full message and traceback."""
    known: set[str] = set()
    if site is not None:
        values: list[Any] = [site.data_path, site.model_path, site.site_dir, site.coordinator_key, site.supernode_key]
        values += [v for v in site.options.values() if isinstance(v, str) and ("/" in v or os.sep in v)]
        for v in values:
            if v is None or not str(v).strip() or str(v) in (".", "/"):
                continue
            known.add(str(v))
            try:
                known.add(str(Path(str(v)).expanduser().resolve()))
            except (OSError, RuntimeError):
                pass
    for path in sorted(known, key=len, reverse=True):  # longest first: a data path inside the site dir
        text = text.replace(path, LOCAL_PATH)
    text = _QUOTED_PATH_RE.sub(lambda m: f"{m.group(1)}{LOCAL_PATH}{m.group(1)}", text)
    return _PATH_RE.sub(LOCAL_PATH, text)


def say(site: Site, msg: str) -> None:
    """Site output goes to the SuperNode's log (never to the coordinator)."""
    print(f"[{site.site}] {msg}", flush=True)


def check_budget(site: Site, record: dict[str, Any], adapter_sent: bool) -> None:
    """Refuse (before anything is computed or sent) a release beyond the site's ``privacy-budget``."""
    budget = site.policy.get("privacy-budget", 0.0)
    if not budget:
        return
    from common.privacy import PrivacyBudgetError, check_budget, read_egress

    past = read_egress(site.egress_path) if site.egress_path.exists() else []
    try:
        total = check_budget(budget, past, record, adapter_sent)
    except PrivacyBudgetError as exc:
        raise SiteError(str(exc)) from None
    say(site, f"privacy budget: ε {total:.3f} of {budget:g} after this release")


def allowed_layer(site: Site, family: Family, requested: int) -> int:
    """The request's layer in ONE spelling, if the site's ``z-layers`` allow it (``ReleaseRefused``
    otherwise): ``-1`` and ``n - 1`` are the same layer, so they share one cache key and one
    ``embedding_spec``. The last layer is spelt ``-1`` (what every registry holds), any other
    layer by its index from 0. A family whose z is its model's output alone releases only ``-1``."""
    try:
        n = family.z_states(site.inputs())
    except FamilyError as exc:
        raise SiteError(str(exc)) from None
    if n <= 1:
        if requested != -1:
            raise ReleaseRefused(
                "layer-not-allowed",
                f"a {family.name} site's z is its base model's output (embed_layer -1); it releases no other layer",
            )
        return -1
    layer = site.release.embedding_layer(requested, n)
    return -1 if layer == n - 1 else layer


@dataclass
class ZRelease:
    """One z as it leaves the site, and what the reply says about it."""

    z: np.ndarray
    info: dict[str, Any]  # base_fingerprint, sample_count, token_count, embedding_spec
    mech: Any  # ZMechanism or None
    repeat: bool  # the same noisy z this site already released (no new privacy cost)


def release_z(
    site: Site,
    family: Family,
    examples: Sequence[Any],
    layer: int,
    load: Callable[[], Base],
    adapter_sent: bool = False,
    check: bool = True,
) -> ZRelease:
    """z over ``examples`` at the (normalised) ``layer``: the cached noisy z when this site already
    released one for exactly this data, layer and mechanism; else a fresh one, after the budget
    check (``check``). With the site's Gaussian mechanism on, the family clips each example's
    vector (one example is one privacy unit) and noise from OS entropy is added here. A fresh
    noisy z is cached only once its reply's egress line is on disk (``site.after_logged``, run by
    ``client/app.py``), so a reply that never left costs nothing and a z that did leave is never
    re-sent as "already released" without having been logged."""
    from common.privacy import ZMechanism, release_record

    mech = ZMechanism.from_policy(site.policy)
    earlier = differencing_guard(site, family, examples, layer)
    if earlier is not None:
        return earlier
    cache = z_cache_path(site, family.name, family.data_digest(examples), layer, mech) if mech is not None else None
    cached = cached_z(site, cache) if cache is not None else None
    if cached is None and mech is not None:  # a z released before the cache was keyed by family
        cached = cached_z(site, legacy_z_cache_path(site, family.data_digest(examples), layer, mech))
    if cached is not None:
        say(site, "z: re-sending the noisy z already released for this data (no new privacy cost)")
        return ZRelease(cached[0], cached[1], mech, True)
    if check:
        check_budget(site, release_record(None, mech, adapter_sent=adapter_sent), adapter_sent)
    base = load()
    emb = family.embed(base, site.inputs(), examples, layer, mech.clip if mech else None)
    info = {
        "base_fingerprint": base.fingerprint,
        # counts leave rounded (client/history.py): the coordinator only stores and shows them
        "sample_count": round_count(emb.n_examples, site.release.min_examples),
        "token_count": 0,
        "embedding_spec": emb.spec(),
    }
    if mech is None:
        keep_answer(site, family, examples, layer, emb.z, info)
        return ZRelease(emb.z, info, None, False)
    say(
        site,
        f"z: Gaussian mechanism, clip {mech.clip:g} ({emb.n_clipped}/{emb.n_examples} {family.unit}s clipped), "
        f"noise multiplier {mech.noise_multiplier:.3f}, epsilon {mech.epsilon:.3f} at delta {mech.delta:g}",
    )
    z = mech.apply(emb.z, emb.n_tokens)
    if cache is not None:
        site.after_logged.append(lambda: store_z(cache, z, info))
    keep_answer(site, family, examples, layer, z, info)
    return ZRelease(z, info, mech, False)


def _z_scope(site: Site, family: Family, layer: int) -> tuple[Any, str]:
    from client.history import ReleaseHistory

    scope = wire.canonical_json({"family": family.name, "model": str(site.model_path), "layer": layer})
    return ReleaseHistory(site.site_dir), scope


def _z_items(family: Family, examples: Sequence[Any]) -> list[str]:
    """One digest per item z is pooled over, by exactly what z reads of it (``Family.data_digest``
    of the item alone): the same report is the same item at enrolment (labelled) and in a query."""
    return [family.data_digest([x]) for x in examples]


def differencing_guard(site: Site, family: Family, examples: Sequence[Any], layer: int) -> ZRelease | None:
    """Issue 26 class 2 (``client/history.py``): a z over a set that differs from an earlier z's
    set by fewer than ``z-min-examples`` items is answered with that earlier z and its counts (no
    new information, no new privacy cost); with nothing kept to answer from, it is refused.
    None: the release may go ahead (and is now recorded)."""
    from client.history import HistoryError

    history, scope = _z_scope(site, family, layer)
    try:
        close = history.check("z", scope, _z_items(family, examples), site.release.min_examples)
    except HistoryError as exc:
        raise SiteError(str(exc)) from None
    if close is None:
        return None
    minimum = site.release.min_examples
    answer = close.get("answer")
    if not answer:
        raise ReleaseRefused(
            "difference-too-small",
            f"this z would differ from one released earlier by fewer than {minimum} examples "
            "(z-min-examples); the difference would isolate them. Add or remove at least that many",
        )
    say(site, f"z: the data differs from an earlier release by fewer than {minimum} examples; re-sending that z")
    from common.privacy import ZMechanism

    return ZRelease(
        np.asarray(answer["z"], dtype=np.float32), answer["info"], ZMechanism.from_policy(site.policy), True
    )


def keep_answer(
    site: Site, family: Family, examples: Sequence[Any], layer: int, z: np.ndarray, info: dict[str, Any]
) -> None:
    """Keep the z this release sends with its history entry (it leaves anyway), for later answers."""
    history, scope = _z_scope(site, family, layer)
    history.remember("z", scope, _z_items(family, examples), {"z": [float(x) for x in z], "info": info})


def guard_metrics(site: Site, family: Family, held: Sequence[Any]) -> bool:
    """Whether held-out metrics over ``held`` may leave: not when the set differs from an earlier
    metrics release's by fewer than ``metrics-min-reports`` items (``n₂m₂ − n₁m₁`` would be those
    items' scores); the metrics are then withheld. An allowed release is recorded before it leaves."""
    from client.history import HistoryError, ReleaseHistory, item_digest

    scope = wire.canonical_json({"family": family.name, "model": str(site.model_path)})
    minimum = site.release.min_metric_reports
    try:
        close = ReleaseHistory(site.site_dir).check("metrics", scope, [item_digest(x) for x in held], minimum)
    except HistoryError as exc:
        raise SiteError(str(exc)) from None
    if close is not None:
        say(
            site,
            f"metrics withheld: the held-out set differs from an earlier release's by fewer than {minimum} "
            "items (metrics-min-reports); the difference would isolate their scores",
        )
        return False
    return True


def round_metric_counts(metrics: dict[str, float], minimum: int) -> dict[str, float]:
    """Counts among the metrics (``n``, ``<arm>_n``) rounded down to a multiple of the minimum."""
    return {k: (float(round_count(int(v), minimum)) if k == "n" or k.endswith("_n") else v) for k, v in metrics.items()}


def z_cache_path(site: Site, family: str, data_digest: str, layer: int, mech: Any) -> Path:
    """Where the noisy z released for exactly this family, data, model, normalised layer and
    mechanism is kept."""
    key = wire.canonical_json(
        {
            "family": family,
            "data": data_digest,
            "model": str(site.model_path),
            "layer": layer,
            "clip": mech.clip,
            "sigma": mech.noise_multiplier,
            "delta": mech.delta,
        }
    )
    return site.site_dir / "privacy" / f"z-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def legacy_z_cache_path(site: Site, data_digest: str, layer: int, mech: Any) -> Path:
    """Where a site kept a released noisy z before the cache was keyed by family (the digest was
    then named "texts"): still read, so an upgraded site re-sends what it released, at no new cost."""
    key = wire.canonical_json(
        {
            "texts": data_digest,
            "model": str(site.model_path),
            "layer": layer,
            "clip": mech.clip,
            "sigma": mech.noise_multiplier,
            "delta": mech.delta,
        }
    )
    return site.site_dir / "privacy" / f"z-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def cached_z(site: Site, path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The noisy z this site already released for exactly this data and this mechanism, if any."""
    try:
        saved = json.loads(path.read_text())
        return np.asarray(saved["z"], dtype=np.float32), saved["info"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # torn by a crash: a fresh z is a new, counted release
        say(site, f"ignoring unreadable z cache {path} ({exc})")
        return None


def store_z(path: Path, z: np.ndarray, info: dict[str, Any]) -> None:
    """Keep a released noisy z durably (fsynced, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"z": [float(x) for x in z], "info": info}))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
