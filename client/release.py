"""What the site's privacy policy does to a release: the Gaussian mechanism on z, the privacy
budget checked before anything is computed, and the cache that re-sends the *same* noisy z for
the same data (repeated queries cannot average the noise away)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.site import Site, SiteError
from common.protocol import wire


def say(site: Site, msg: str) -> None:
    """Site output goes to the SuperNode's log (never to the coordinator)."""
    print(f"[{site.site}] {msg}", flush=True)


#: where a site keeps each report's token sum under its base model (``common.embedding.mean_embedding``'s
#: cache): derived from the private reports, so it stays in the site directory like they do
EMBEDDING_CACHE_DIR = "embedding-cache"


def site_embedding(
    model: Any, tok: Any, texts: list[str], site: Site, layer: int, fingerprint: str = ""
) -> tuple[Any, np.ndarray, Any]:
    """z as it leaves the site: (EmbeddingResult, z, ZMechanism or None). With the site's Gaussian
    mechanism on, each report's token sum is clipped and noise from OS entropy is added.

    With the base model's ``fingerprint``, each report's float64 token sum is kept in
    ``<site-dir>/embedding-cache/`` and not computed again: the embedding query of an evaluation
    covers the reports the site enrolled with, plus its held-out ones. z is always taken from the
    float32 weights (``client/site.py``), so a cached sum is one of those."""
    from common.embedding import ExampleSumsCache, mean_embedding
    from common.privacy import ZMechanism

    mech = ZMechanism.from_policy(site.policy)
    cache = None
    if fingerprint:
        name = hashlib.sha256(f"{fingerprint}|{site.model_path}".encode()).hexdigest()[:32]
        cache = ExampleSumsCache(site.site_dir / EMBEDDING_CACHE_DIR / f"{name}.npz")
    emb = mean_embedding(
        model, tok, texts, layer=layer, clip_norm=mech.clip if mech else None, cache=cache, cache_tag=fingerprint
    )
    if cache is not None:
        try:
            cache.save()
        except OSError as exc:  # a full disk costs the next query time, not this reply
            say(site, f"could not keep the report embeddings cache ({exc})")
    if mech is None:
        return emb, emb.z, None
    say(
        site,
        f"z: Gaussian mechanism, clip {mech.clip:g} ({emb.n_clipped}/{emb.n_examples} reports clipped), "
        f"noise multiplier {mech.noise_multiplier:.3f}, epsilon {mech.epsilon:.3f} at delta {mech.delta:g}",
    )
    return emb, mech.apply(emb.z, emb.n_tokens), mech


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


def n_hidden_states(site: Site) -> int:
    """How many hidden states the site's base model has (layers + the embedding layer), from its
    config alone, so a request's layer is checked before any model is loaded."""
    from common.models import resolve_model_dir

    try:
        cfg = json.loads((Path(resolve_model_dir(site.model_path)) / "config.json").read_text())
        return int(cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"]) + 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SiteError(f"cannot read the layer count of base model {site.model_path}: {exc}") from None


def allowed_layer(site: Site, requested: int) -> int:
    """The request's layer in ONE spelling, if the site's ``z-layers`` allow it (``ReleaseRefused``
    otherwise): ``-1`` and ``n - 1`` are the same layer, so they share one cache key and one
    ``embedding_spec``. The last layer is spelt ``-1`` (what every registry holds), any other
    layer by its index from 0."""
    n = n_hidden_states(site)
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
    texts: list[str],
    layer: int,
    load: Callable[[], tuple[Any, Any, str]],
    adapter_sent: bool = False,
    check: bool = True,
) -> ZRelease:
    """z over ``texts`` at the (normalised) ``layer``: the cached noisy z when this site already
    released one for exactly this data, layer and mechanism; else a fresh one, after the budget
    check (``check``). A fresh noisy z is cached only once its reply's egress line is on disk
    (``site.after_logged``, run by ``client/app.py``), so a reply that never left costs nothing
    and a z that did leave is never re-sent as "already released" without having been logged."""
    from common.privacy import ZMechanism, release_record

    mech = ZMechanism.from_policy(site.policy)
    cache = z_cache_path(site, texts, layer, mech) if mech is not None else None
    cached = cached_z(site, cache) if cache is not None else None
    if cached is not None:
        say(site, "z: re-sending the noisy z already released for this data (no new privacy cost)")
        return ZRelease(cached[0], cached[1], mech, True)
    if check:
        check_budget(site, release_record(None, mech, adapter_sent=adapter_sent), adapter_sent)
    model, tok, fp = load()
    emb, z, mech = site_embedding(model, tok, texts, site, layer, fp)
    info = {
        "base_fingerprint": fp,
        "sample_count": emb.n_examples,
        "token_count": int(emb.n_tokens),
        "embedding_spec": emb.spec(),
    }
    if cache is not None:
        site.after_logged.append(lambda: store_z(cache, z, info))
    return ZRelease(z, info, mech, False)


def z_cache_path(site: Site, texts: list[str], layer: int, mech: Any) -> Path:
    """Where the noisy z released for exactly these texts, model, normalised layer and mechanism is kept."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    key = wire.canonical_json(
        {
            "texts": h.hexdigest(),
            "model": str(site.model_path),
            "layer": layer,
            "clip": mech.clip,
            "sigma": mech.noise_multiplier,
            "delta": mech.delta,
        }
    )
    return site.site_dir / "privacy" / f"z-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def cached_z(site: Site, path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The noisy z this site already released for exactly these texts and this mechanism, if any."""
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
