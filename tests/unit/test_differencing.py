"""Issue 26 class 2: differencing over time. Before the fix a coordinator that asked again after
one report was added got ``z₂·T₂ − z₁·T₁`` = that report's exact token sum (the exact ``token_count``
left with every z), ``n₂m₂ − n₁m₁`` = its exact score, and enrolment z minus query z = the held-out
set. These tests replay each attack against the real site code (``client/release.py``,
``client/handlers.py``, ``client/history.py``) and show that the coordinator can no longer isolate
fewer items than the site's minimum set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from support import make_tiny_sam, tiny_adapter, write_site_data

from client.history import ReleaseHistory, round_count
from client.policy import ReleaseRefused
from client.release import release_z
from client.site import Site, SiteError, load_family_data, site_from_context
from common.families import get_family
from common.families.report.data import read_jsonl, report_groups, write_jsonl
from common.protocol import wire

MIN_Z, MIN_METRICS = 4, 2


def _report_site(tmp_path, model_dir, n_eval: int = 5) -> Site:
    data = write_site_data(tmp_path / "data", {"a": "ct-head"}, n=20, n_eval=n_eval)["a"]
    nc = {
        "site-id": "a",
        "data-path": str(data),
        "model-path": str(model_dir),
        "site-dir": str(tmp_path / "site"),
        "threads": 1,
        "z-min-examples": MIN_Z,
        "metrics-min-reports": MIN_METRICS,
    }
    return site_from_context(Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={}))


def _query(site: Site, **cfg):
    """One ``query.embed`` through the site's real handler: (z, meta)."""
    from client.handlers import embed

    req = wire.parse_request(
        wire.EMBED, wire.build_request(wire.EMBED, {"nonce": "n" * 32, "task": "report-text", **cfg})
    )
    reply = embed(req, site, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    z, meta = wire.parse_embed_reply(reply)
    return np.asarray(z, dtype=np.float64), meta


def _add_reports(site: Site, k: int, start: int = 40) -> list:
    """``k`` more labelled reports in the site's training file (the data changed between runs)."""
    extra = [e for e in report_groups()["ct-head"][start : start + k]]
    path = site.data_path / "train.jsonl"
    write_jsonl(path, [*read_jsonl(path), *extra])
    return extra


def _token_sum(site: Site, report) -> np.ndarray:
    """What the attack wants: the added report's own last-layer token sum (computed at the site)."""
    family = get_family("report-text")
    base = family.load_base(site.inputs())
    ex = family.z_examples(type(load_family_data(site, family))([report], [], [], ["g"]), enrolment=False)
    emb = family.embed(base, site.inputs(), ex, -1, None)
    return np.asarray(emb.z, dtype=np.float64) * emb.n_tokens


def test_one_added_report_cannot_be_isolated_from_two_z_releases(tmp_path, tiny_model_dir):
    site = _report_site(tmp_path, tiny_model_dir)
    z1, m1 = _query(site)
    assert m1["token_count"] == 0  # not sent: only the site needs it
    assert m1["sample_count"] % MIN_Z == 0 and m1["sample_count"] >= MIN_Z
    (added,) = _add_reports(site, 1)
    z2, m2 = _query(site)
    # the coordinator's attack, with the counts it is given: nothing is left to isolate
    estimate = z2 * max(m2["token_count"], 1) - z1 * max(m1["token_count"], 1)
    target = _token_sum(site, added)
    assert np.array_equal(z1, z2) and m1 == {**m2, "nonce": m1["nonce"]}
    assert np.linalg.norm(estimate - target) / np.linalg.norm(target) > 0.5
    # with a difference of the minimum set (4 more reports: 5 from the first release) a new z leaves
    _add_reports(site, MIN_Z, start=41)
    z3, _ = _query(site)
    assert not np.array_equal(z3, z1)
    # and a query between the two (one report fewer than the last) is answered from an earlier one
    lines = read_jsonl(site.data_path / "train.jsonl")
    write_jsonl(site.data_path / "train.jsonl", lines[:-1])
    z4, _ = _query(site)
    assert any(np.array_equal(z4, z) for z in (z1, z3))


def test_enrolment_z_minus_query_z_does_not_isolate_the_held_out_set(tmp_path, tiny_model_dir):
    """Enrolment pools z over the training reports; a query over every report: the two differ by the
    held-out set (2 with the tests' default split), fewer than z-min-examples."""
    site = _report_site(tmp_path, tiny_model_dir, n_eval=2)
    family = get_family("report-text")
    data = load_family_data(site, family)
    enrol = release_z(
        site, family, family.z_examples(data, enrolment=True), -1, lambda: family.load_base(site.inputs())
    )
    zq, meta = _query(site)
    assert np.array_equal(zq, np.asarray(enrol.z, dtype=np.float64))  # the enrolment z, re-sent
    assert meta["sample_count"] == enrol.info["sample_count"]


def test_without_an_earlier_answer_the_release_is_refused(tmp_path, tiny_model_dir):
    """A history entry whose z was never kept (a crash between the record and the send): fail closed."""
    site = _report_site(tmp_path, tiny_model_dir)
    family = get_family("report-text")
    examples = family.z_examples(load_family_data(site, family), enrolment=False)
    items = [family.data_digest([x]) for x in examples]
    scope = wire.canonical_json({"family": family.name, "model": str(site.model_path), "layer": -1})
    assert ReleaseHistory(site.site_dir).check("z", scope, items[:-1], MIN_Z) is None
    with pytest.raises(ReleaseRefused, match="fewer than 4 examples"):
        _query(site)


def test_metrics_over_sets_one_report_apart_are_withheld(tmp_path, tiny_model_dir):
    """``max_eval`` 2 then 3 (or one report added to the held-out set): n₂m₂ − n₁m₁ would be one
    report's score; the second set's metrics stay at the site. Counts leave rounded."""
    from client.handlers import score

    site = _report_site(tmp_path, tiny_model_dir, n_eval=5)
    adapter = tiny_adapter(tiny_model_dir, seed=1)
    cfg = {"task": "report-text", "evaluate": True}
    m2, ok2 = score(site, {**cfg, "max_eval": 2}, adapter)
    assert ok2 and m2["n"] == 2
    m3, ok3 = score(site, {**cfg, "max_eval": 3}, adapter)
    assert (m3, ok3) == ({}, False)
    m5, ok5 = score(site, {**cfg, "max_eval": 5}, adapter)  # 3 apart from the first: allowed
    assert ok5 and m5["n"] == round_count(5, MIN_METRICS) == 4
    again, ok = score(site, {**cfg, "max_eval": 2}, adapter)  # the same set again: nothing new
    assert ok and again["n"] == 2


def test_the_history_is_durable_and_a_damaged_one_fails_closed(tmp_path, tiny_model_dir):
    site = _report_site(tmp_path, tiny_model_dir)
    _query(site)
    path = site.site_dir / "privacy" / "releases.jsonl"
    lines = path.read_text().splitlines()
    assert lines and all(json.loads(x)["kind"] == "z" for x in lines)
    with open(path, "a") as fh:
        fh.write('{"v":1,"kind":"z"')  # a torn tail: that release never left; ignored, then cut
    _query(site)
    assert path.read_text().endswith("\n")
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(SiteError, match="release history"):
        _query(site)


def test_segmentation_z_one_image_apart_is_answered_from_the_earlier_release(tmp_path):
    """The same release code guards every family: SAM z over 6 images, then over 7."""
    family = get_family("segmentation")
    model = make_tiny_sam(tmp_path / "sam", seed=0)
    site = Site("s", tmp_path / "data", str(model), tmp_path / "site")
    site.release = type(site.release)(min_examples=MIN_Z)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(64, 64), dtype=np.uint8) for _ in range(7)]
    base = family.load_base(site.inputs())
    first = release_z(site, family, images[:6], -1, lambda: base)
    second = release_z(site, family, images, -1, lambda: base)
    assert second.repeat and np.array_equal(second.z, first.z) and second.info == first.info
    assert first.info["token_count"] == 0 and first.info["sample_count"] == 4
    more = [rng.integers(0, 255, size=(64, 64), dtype=np.uint8) for _ in range(MIN_Z)]
    third = release_z(site, family, [*images[:6], *more], -1, lambda: base)
    assert not third.repeat and not np.array_equal(third.z, first.z)
