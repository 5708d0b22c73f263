"""The Gaussian mechanism on z and the privacy accounting (``common/privacy.py``).

Checked against independent computations: the analytic δ(ε) against a numerical integral of the
privacy-loss distribution, the ε against the classical and RDP bounds, the sensitivity claim
against the embedding of neighbouring datasets, and the noise against its stated scale.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.embedding import mean_embedding
from common.families.report.data import report_groups
from common.models import load_base_model
from common.privacy import (
    PrivacyConfigError,
    ZMechanism,
    calibrate_gaussian,
    composed_epsilon,
    gaussian_delta,
    gaussian_epsilon,
    release_record,
    spent_from_egress,
)

#: real findings of six ct-head reports (lengths differ, so a median clip scales some and not others)
TEXTS = [e.prompt for e in report_groups()["ct-head"][:6]]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def delta_by_integration(eps: float, sigma: float) -> float:
    """δ(ε) = E_{x~P}[(1 - e^{ε - L(x)})_+] with P = N(0, σ²), Q = N(1, σ²), L = log p/q (Δ = 1)."""
    x = np.linspace(-40 * sigma - 1, 40 * sigma + 1, 2_000_001)
    dx = x[1] - x[0]
    log_p = -(x**2) / (2 * sigma**2)
    loss = (-(x**2) + (x - 1) ** 2) / (2 * sigma**2)
    dens = np.exp(log_p) / (sigma * math.sqrt(2 * math.pi))
    return float(np.sum(dens * np.clip(1 - np.exp(eps - loss), 0, None)) * dx)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_analytic_delta_matches_the_privacy_loss_integral(sigma):
    for eps in (0.1, 1.0, 3.0):
        assert gaussian_delta(eps, sigma) == pytest.approx(delta_by_integration(eps, sigma), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0, 20.0])
def test_epsilon_is_the_smallest_that_meets_delta(sigma):
    delta = 1e-5
    eps = gaussian_epsilon(sigma, delta)
    assert gaussian_delta(eps, sigma) <= delta < gaussian_delta(eps * (1 - 1e-6), sigma)
    # tighter than RDP for one release, and than the classical bound where that applies (ε < 1)
    assert eps <= composed_epsilon([(sigma, 1.0, 1)], delta) + 1e-9
    classical = math.sqrt(2 * math.log(1.25 / delta)) / sigma
    if classical < 1:
        assert eps < classical
    assert calibrate_gaussian(eps, delta) == pytest.approx(sigma, rel=1e-6)


def test_composition_grows_with_releases():
    one = composed_epsilon([(1.0, 1.0, 1)])
    two = composed_epsilon([(1.0, 1.0, 1), (1.0, 1.0, 1)])
    with_sgd = composed_epsilon([(1.0, 0.1, 40), (1.0, 1.0, 1)])
    assert one < two < 2 * one and with_sgd > one
    # Gaussian releases without subsampling compose exactly (GDP): two at σ are one at σ/√2
    assert two == pytest.approx(gaussian_epsilon(1.0 / math.sqrt(2.0)))
    assert composed_epsilon([(2.0, 1.0, 1), (1.0, 1.0, 3)]) == pytest.approx(gaussian_epsilon((3.25) ** -0.5))
    assert composed_epsilon([]) == 0.0


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"z-clip": 10.0}, "protects nothing"),
        ({"z-noise-multiplier": 1.0}, "needs 'z-clip'"),
        ({"z-clip": 1.0, "z-noise-multiplier": 1.0, "z-epsilon": 2.0}, "both"),
        ({"z-noise-sigma": 0.1}, "no longer supported"),
        ({"z-clip": -1.0, "z-noise-multiplier": 1.0}, "z-clip must be a positive"),
        ({"z-clip": 1.0, "z-epsilon": 1.0, "z-delta": 2.0}, "delta must be in (0, 1)"),
    ],
)
def test_bad_policies_are_refused_with_the_fix(policy, message):
    with pytest.raises(PrivacyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ZMechanism.from_policy(policy)


def test_policy_calibrates_sigma_from_a_target_epsilon():
    assert ZMechanism.from_policy({}) is None
    mech = ZMechanism.from_policy({"z-clip": 50.0, "z-epsilon": 2.0, "dp-delta": 1e-6})
    assert mech.delta == 1e-6 and mech.epsilon == pytest.approx(2.0, rel=1e-6)
    assert mech.noise_multiplier == pytest.approx(calibrate_gaussian(2.0, 1e-6))


def test_loose_clip_leaves_z_unchanged_and_tight_clip_bounds_each_report(tiny):
    model, tok = tiny
    plain = mean_embedding(model, tok, TEXTS, progress=False)
    probe = mean_embedding(model, tok, TEXTS, progress=False, return_sums=True)
    norms = probe.example_norms
    assert norms is not None and len(norms) == len(TEXTS)
    np.testing.assert_allclose(probe.example_sums.sum(axis=0) / probe.n_tokens, plain.z, rtol=1e-5, atol=1e-6)
    assert probe.example_tokens is not None and int(probe.example_tokens.sum()) == probe.n_tokens
    loose = mean_embedding(model, tok, TEXTS, progress=False, clip_norm=float(norms.max()) * 1.01)
    np.testing.assert_allclose(loose.z, plain.z, rtol=1e-5, atol=1e-6)
    assert loose.n_clipped == 0

    clip = float(np.median(norms))
    full = mean_embedding(model, tok, TEXTS, progress=False, clip_norm=clip)
    assert full.n_clipped == int((norms > clip).sum()) > 0
    # add/remove one report: the clipped token sum moves by at most the clip norm (the sensitivity)
    for i in range(len(TEXTS)):
        rest = mean_embedding(model, tok, TEXTS[:i] + TEXTS[i + 1 :], progress=False, clip_norm=clip)
        moved = np.linalg.norm(full.z.astype(np.float64) * full.n_tokens - rest.z.astype(np.float64) * rest.n_tokens)
        assert moved <= clip * (1 + 1e-4)


def test_noise_has_the_stated_scale_and_is_not_reproducible():
    mech = ZMechanism(clip=20.0, noise_multiplier=1.5)
    z = np.zeros(20_000, np.float32)
    a, b = mech.apply(z, n_tokens=300), mech.apply(z, n_tokens=300)
    assert not np.array_equal(a, b) and a.dtype == np.float32
    assert float(a.std()) == pytest.approx(1.5 * 20.0 / 300, rel=0.03)
    seeded = mech.apply(z, 300, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(seeded, mech.apply(z, 300, rng=np.random.default_rng(0)))


def test_release_record_reports_each_part_and_the_total():
    mech = ZMechanism(clip=10.0, noise_multiplier=2.0)
    dp = {
        "dp_epsilon": 3.0,
        "dp_delta": 1e-5,
        "dp_noise_multiplier": 1.0,
        "dp_max_grad_norm": 1.0,
        "dp_sample_rate": 0.0625,
        "dp_steps": 40,
    }
    both = release_record(dp, mech, adapter_sent=True)
    assert both["dp_sgd"] and both["z_mechanism"] == "gaussian"
    assert both["epsilon_total"] == pytest.approx(composed_epsilon([(1.0, 0.0625, 40), (2.0, 1.0, 1)]))
    assert both["epsilon_total"] > max(both["z_epsilon"], composed_epsilon([(1.0, 0.0625, 40)]))
    z_only = release_record(None, mech, adapter_sent=False)
    assert z_only["epsilon_total"] == z_only["z_epsilon"] == pytest.approx(mech.epsilon)
    # a non-private part leaves no finite total
    assert "epsilon_total" not in release_record(None, mech, adapter_sent=True)
    assert "epsilon_total" not in release_record(dp, None, adapter_sent=True)
    assert release_record(None, None, adapter_sent=False) == {"dp_sgd": False}


def _egress_line(kind: str, privacy: dict | None, records: tuple[str, ...]) -> dict:
    recs = [{"name": n, "kind": "arrays", "items": []} for n in records if n != "meta"]
    if privacy is not None:
        recs.append({"name": "meta", "kind": "config", "items": [{"key": "privacy", "value": json.dumps(privacy)}]})
    return {"ts": "2026-11-25T00:00:00Z", "message_type": kind, "records": recs}


def test_spent_from_egress_composes_every_release():
    mech = ZMechanism(clip=10.0, noise_multiplier=2.0)
    dp = {
        "dp_epsilon": 3.0,
        "dp_delta": 1e-5,
        "dp_noise_multiplier": 1.0,
        "dp_max_grad_norm": 1.0,
        "dp_sample_rate": 0.0625,
        "dp_steps": 40,
    }
    lines = [
        _egress_line("train", release_record(dp, mech, True), ("adapter", "embedding", "meta")),
        _egress_line("query", release_record(None, mech, False), ("embedding", "meta")),
        _egress_line("query", release_record(None, mech, False), ("embedding", "meta")),
        {"ts": "t", "message_type": "query", "records": [{"name": "info", "items": []}]},
    ]
    spent = spent_from_egress(lines)
    assert spent.epsilon == pytest.approx(
        composed_epsilon([(1.0, 0.0625, 40), (2.0, 1.0, 1), (2.0, 1.0, 1), (2.0, 1.0, 1)])
    )
    assert len(spent.releases) == 3 and not spent.non_private and "total: ε =" in spent.summary()
    leaky = spent_from_egress(
        [
            *lines,
            _egress_line("train", {"dp_sgd": False}, ("adapter", "embedding", "meta")),
            {
                "ts": "t2",
                "message_type": "train.apply",
                "records": [{"name": "metrics", "items": [{"key": "rouge_l", "value": 0.2}]}],
            },
            {"ts": "t3", "message_type": "train.apply", "records": [{"name": "metrics", "items": []}]},
        ]
    )
    assert leaky.epsilon == math.inf and len(leaky.non_private) == 2 and "ε = ∞" in leaky.summary()


def test_cli_plans_calibrates_and_accounts(tmp_path, tiny_model_dir, capsys):
    from common.families.report.data import report_groups, write_jsonl
    from deploy.cli import main

    main(["privacy", "epsilon", "--epsilon", "4"])
    assert "noise multiplier 1.081" in capsys.readouterr().out
    main(["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.0625", "--steps", "40"])
    assert "RDP accountant" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["privacy", "epsilon"])
    assert exc.value.code == 2 and "exactly one of" in capsys.readouterr().err

    data = tmp_path / "site.jsonl"
    write_jsonl(data, report_groups()["ct-head"][:6])
    main(["privacy", "z-norms", "--data", str(data), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert "6 reports" in out and "p50=" in out and "keep them at the site" in out

    plain, private = tmp_path / "z.npy", tmp_path / "z-private.npy"
    main(["embed", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(plain), "--quiet"])
    main(
        [
            "embed",
            "--data",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(private),
            "--quiet",
            "--json",
            "--z-clip",
            "1e6",
            "--z-epsilon",
            "8",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["privacy"]["z_epsilon"] == pytest.approx(8.0, rel=1e-6)
    assert not np.array_equal(np.load(plain), np.load(private))  # a clip above every norm: only the noise differs
    with pytest.raises(SystemExit):
        main(["embed", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(private), "--z-clip", "5"])
    assert "sets --z-clip without noise, which protects nothing: add --z-noise-multiplier" in capsys.readouterr().err

    mech = ZMechanism(clip=10.0, noise_multiplier=2.0)
    log = tmp_path / "egress.jsonl"
    log.write_text(
        json.dumps(_egress_line("query.embed", release_record(None, mech, False), ("embedding", "meta"))) + "\n"
    )
    main(["privacy", "spent", "--egress", str(log), "--json"])
    assert json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(composed_epsilon([(2.0, 1.0, 1)]))
    with pytest.raises(SystemExit):
        main(["privacy", "spent", "--egress", str(tmp_path / "missing.jsonl")])
    assert "a site writes it at <site-dir>/egress.jsonl" in capsys.readouterr().err


def test_budget_counts_private_releases_and_refuses_what_would_exceed_it():
    from common.privacy import PrivacyBudgetError, check_budget

    mech = ZMechanism(clip=10.0, noise_multiplier=calibrate_gaussian(2.0))
    z_release = release_record(None, mech, adapter_sent=False)
    past = [
        _egress_line("query.embed", z_release, ("embedding", "meta")),
        _egress_line("train", {"dp_sgd": False}, ("adapter", "embedding", "meta")),
    ]  # before the budget
    two = check_budget(10.0, past, z_release, adapter_sent=False)
    assert two == pytest.approx(composed_epsilon([(mech.noise_multiplier, 1.0, 1)] * 2))
    assert check_budget(2.0, past, release_record(None, mech, False, z_repeat=True), False) == pytest.approx(
        2.0, rel=0.2
    )
    with pytest.raises(PrivacyBudgetError, match=r"exhausted: this release would bring the site to ε = \d"):
        check_budget(two - 0.01, past, z_release, adapter_sent=False)
    with pytest.raises(PrivacyBudgetError, match="would not be differentially private .the adapter"):
        check_budget(100.0, [], release_record(None, mech, adapter_sent=True), adapter_sent=True)
    with pytest.raises(PrivacyBudgetError, match="z is sent without the Gaussian mechanism"):
        check_budget(100.0, [], release_record(None, None, adapter_sent=False), adapter_sent=False)


def test_a_noisy_z_released_before_the_family_keyed_cache_is_re_sent_not_redrawn(tmp_path):
    """A site upgraded from the cache keyed by "texts" still finds the noisy z it released (same data,
    model, layer, mechanism) and re-sends it at no new privacy cost: it never draws fresh noise."""
    import hashlib

    from client.release import legacy_z_cache_path, release_z, store_z
    from client.site import Site
    from common.families import get_family
    from common.families.report.data import Example
    from common.privacy import ZMechanism

    site = Site("a", tmp_path / "data", "unused-model", tmp_path / "site", policy={"z-clip": 5.0, "z-epsilon": 4.0})
    examples = [Example(f"Findings: case {i}.", None, "ct-head", str(i)) for i in range(3)]
    old = hashlib.sha256()  # what the earlier release.z_cache_path hashed: each text's sha256
    for ex in examples:
        old.update(hashlib.sha256(ex.prompt.encode()).digest())
    family = get_family("report-text")
    assert family.data_digest(examples) == old.hexdigest()
    mech = ZMechanism.from_policy(site.policy)
    released = np.arange(4, dtype=np.float32)
    store_z(legacy_z_cache_path(site, old.hexdigest(), -1, mech), released, {"sample_count": 3})

    def no_model():
        raise AssertionError("a re-sent z must not load the model")

    rel = release_z(site, family, examples, -1, no_model)
    assert rel.repeat and np.array_equal(rel.z, released)
