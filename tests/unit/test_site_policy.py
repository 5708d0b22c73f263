"""The site's release policy (client/policy.py): the request never decides what leaves the site."""

from __future__ import annotations

import pytest

from client.policy import ReleasePolicy, ReleasePolicyError, ReleaseRefused


def test_defaults_release_only_the_last_layer_over_the_whole_set():
    p = ReleasePolicy.from_node_config({})
    assert p.embedding_layer(-1, 31) == 30
    assert p.embedding_layer(30, 31) == 30  # the same layer, one cache key
    with pytest.raises(ReleaseRefused) as e:
        p.embedding_layer(0, 31)  # the token-embedding layer used by the differencing attack
    assert e.value.code == "layer-not-allowed"
    assert p.embedding_examples(48) == 48


@pytest.mark.parametrize("max_examples", [1, 2, 3, 47])
def test_subset_requests_of_the_differencing_attack_are_refused(max_examples):
    with pytest.raises(ReleaseRefused) as e:
        ReleasePolicy().embedding_examples(48, max_examples)
    assert e.value.code == "subset-refused"


def test_a_request_for_at_least_the_whole_set_is_the_whole_set():
    assert ReleasePolicy().embedding_examples(48, 48) == 48
    assert ReleasePolicy().embedding_examples(48, 1000) == 48


def test_too_small_sites_and_metric_sets_are_refused():
    p = ReleasePolicy.from_node_config({"z-min-examples": 20, "metrics-min-reports": "12"})
    with pytest.raises(ReleaseRefused, match="at least 20"):
        p.embedding_examples(19)
    with pytest.raises(ReleaseRefused, match="at least 12"):
        p.metrics(11)
    p.metrics(12)


def test_site_config_may_allow_other_layers():
    p = ReleasePolicy.from_node_config({"z-layers": "-1, 15"})
    assert p.embedding_layer(15, 31) == 15
    with pytest.raises(ReleaseRefused, match="does not exist"):
        p.embedding_layer(31, 31)


@pytest.mark.parametrize(
    "cfg",
    [
        {"z-layers": "last"},
        {"z-layers": ""},
        {"z-min-examples": 0},
        {"metrics-min-reports": "many"},
        {"z-min-examples": True},
    ],
)
def test_invalid_site_config_is_an_error(cfg):
    with pytest.raises(ReleasePolicyError):
        ReleasePolicy.from_node_config(cfg)
