"""A task family plugs in with one folder and one table line, and nothing in ``server/``,
``client/`` or ``deploy/`` learns its name.

The toy family (``tests/support/families/toy/``: its own data, a tiny two-layer model, its own
metric ``accuracy``) is registered by ONE line (``register_family``), then runs enrol -> compose ->
evaluate through the real ServerApp ``main`` and the real ClientApp handlers in this process
(``LocalGrid``), into its own registry under the coordinator's registry root.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import make_tiny_sam
from support.grid import LocalGrid
from support.toy import SITES, run

from common.families import FAMILIES, family_registry_dirs, get_family, register_family
from common.families.base import Family

REPO = Path(__file__).resolve().parents[2]


def test_the_toy_family_implements_the_protocol():
    register_family("toy", "support.families.toy:FAMILY")
    family = get_family("toy")
    assert isinstance(family, Family) and family.metric == "accuracy"


def test_a_family_in_one_folder_enrols_composes_and_evaluates_through_the_real_apps(toy):
    from server.registry import Registry

    enrolled = run(toy, 41, mode="enroll", sites=",".join(SITES))
    assert {s: r["status"] for s, r in enrolled["enroll"].items()} == dict.fromkeys(SITES, "accepted"), enrolled
    assert family_registry_dirs(toy["registry"])["toy"] == toy["registry"] / "toy"
    with Registry(toy["registry"] / "toy", chroma="off") as reg:
        assert sorted(r.meta.site for r in reg.list()) == list(SITES)
        assert reg.representation == "toy-proj-mean" and reg.embedding_dim == 8
        assert {r.meta.task for r in reg.list()} == {"toy"}

    composed = run(toy, 42, mode="compose", target="h1", k=2, strategy="sim")
    out = composed["compose"]["h1"]
    assert out["status"] == "delivered" and out["evaluated"], out
    assert 0.0 <= out["metrics"]["accuracy"] <= 1.0 and "h1" not in out["sites"]
    delivered = toy["tmp"] / "sites" / "h1" / "adapters" / out["adapter_name"]
    assert json.loads((delivered / "rpe-provenance.json").read_text())["task"] == "toy"

    evaluated = run(toy, 43, mode="evaluate", k=2, **{"eval-strategies": "sim,lin"})
    assert evaluated["status"] == "completed", evaluated.get("error")
    rows = evaluated["evaluate"]["rows"]
    assert {r["target"] for r in rows} == set(SITES), evaluated["evaluate"]["problems"]
    assert {r["method"] for r in rows} == {"base", "sim", "lin", "nearest", "avg", "own"}
    assert all(r["metric"] == "accuracy" and 0.0 <= r["score"] <= 1.0 for r in rows)
    with open(evaluated["evaluate"]["outputs"]["csv"], newline="") as fh:
        assert next(csv.reader(fh))[2] == "accuracy"  # the results column is the family's metric
    assert "(Accuracy)" in Path(evaluated["evaluate"]["outputs"]["markdown"]).read_text()


def test_adding_the_toy_family_changed_nothing_in_server_client_or_deploy():
    """No file of the apps names the toy family: it is one folder under tests/ plus one line."""
    out = subprocess.run(
        ["git", "grep", "-n", "-i", "-e", "toy", "--", "server", "client", "deploy"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    hits = [line for line in out.stdout.splitlines() if "support.families" in line or "ToyFamily" in line]
    assert not hits, hits


def test_reading_the_family_table_imports_no_torch():
    code = "import sys, common.families as f; f.family_names(); f.get_family('segmentation'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rpe_embed_computes_the_z_of_any_family_from_a_sites_data(tmp_path, capsys):
    """``rpe embed --family segmentation --images DIR``: the z a segmentation site would release for
    an embedding query (its frozen encoder over the images), and the same command for the toy family."""
    import numpy as np
    from support.families.toy import make_toy_base, write_toy_site

    from common.dataroot import data_root
    from common.families.base import SiteInputs
    from common.families.segmentation.data import read_images
    from deploy.cli import main

    images = data_root() / "prostate-multisite" / "RUNMC" / "train" / "image"
    model = Path(make_tiny_sam(tmp_path / "tiny-sam", seed=0))
    main(
        ["embed", "--family", "segmentation", "--images", str(images), "--model", str(model)]
        + ["--out", str(tmp_path / "z.npy"), "--json"]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["family"] == "segmentation" and summary["representation"] == "sam-encoder-mean"
    family = get_family("segmentation")
    inputs = SiteInputs("x", images, str(model), tmp_path / "work")
    expect = family.embed(family.load_base(inputs), inputs, read_images(images), -1, None).z
    assert summary["examples"] == len(read_images(images)) and np.allclose(np.load(tmp_path / "z.npy"), expect)

    register_family("toy", "support.families.toy:FAMILY")
    site = write_toy_site(tmp_path / "toy-site", seed=1)
    main(
        ["embed", "--family", "toy", "--data", str(site), "--model", str(make_toy_base(tmp_path / "toy-model"))]
        + ["--out", str(tmp_path / "zt.npy"), "--json"]
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dim"] == 8
    with pytest.raises(SystemExit):  # a layer a segmentation z does not have is refused
        main(
            ["embed", "--family", "segmentation", "--images", str(images), "--model", str(model)]
            + ["--layer", "0", "--out", str(tmp_path / "z0.npy")]
        )


def test_the_demo_asks_each_family_for_its_sites_and_settings(tmp_path, tiny_model_dir):
    """``deploy/demo.py`` names no family: each brings its demo recipe (``Family.demo``); a family
    without one (the toy) is simply not in the demo."""
    from deploy.demo import _plan, demo_families, parse_models, pick_families

    register_family("toy", "support.families.toy:FAMILY")
    assert demo_families() == ["report-text", "segmentation"]
    assert pick_families("report") == ("report-text",)
    assert pick_families("report,segmentation") == ("report-text", "segmentation")
    with pytest.raises(ValueError, match="choose from report-text, segmentation"):
        pick_families("toy")
    assert parse_models(["m1", "segmentation=s1"], ("report-text",)) == {"report-text": "m1", "segmentation": "s1"}

    reports = _plan("report-text", tmp_path / "data", "quick", str(tiny_model_dir))
    assert [s.site for s in reports.sites] == ["xray", "ct-abdomen", "ct-head", "mr-head"]
    assert all((Path(s.data_path) / "train.jsonl").is_file() for s in reports.sites)
    assert reports.run_config["base-model"] == reports.model
    segs = _plan("segmentation", tmp_path / "seg", "quick", None)
    assert len(segs.sites) == 6 and segs.model == "litemedsam"
    assert {s.node_config["seg-site"] for s in segs.sites} == {"RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"}


def test_an_unknown_or_half_written_family_is_refused_with_what_is_missing():
    from common.families import UnknownFamilyError

    with pytest.raises(UnknownFamilyError, match="unknown task family 'nope'; known families: report-text"):
        get_family("nope")
    register_family("half", "support.families:__doc__")  # a string: no member of the protocol
    try:
        with pytest.raises(TypeError, match="does not implement Family: it lacks name, metric"):
            get_family("half")
    finally:
        FAMILIES.pop("half")


def test_a_site_whose_node_config_names_an_unknown_family_refuses_everything_loudly(tmp_path):
    from flwr.app import Context, RecordDict

    from client.site import SiteError, site_from_context

    nc = {"site-id": "a", "data-path": str(tmp_path), "task": "report-text,segmentaton"}
    with pytest.raises(SiteError, match="'segmentaton', not a task family this ClientApp has; known: report-text"):
        site_from_context(Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={}))


def test_a_familys_own_settings_travel_in_one_checked_request_key(toy):
    """``options``: the wire checks its shape (a flat JSON object of plain names and scalars), the
    site checks each name and type against the family's ``option_keys``; nothing else is widened."""
    from common.protocol import wire
    from common.protocol.wire import WireError

    base = {"nonce": "n" * 32, "task": "toy", "steps": 2}
    wire.build_request(wire.ENROLL, {**base, "options": '{"init_scale": 0.5}'})
    for bad, why in (
        ('{"init_scale": {"nested": 1}}', "must be a finite number"),
        ('["init_scale"]', "expected a JSON object"),
        ('{"Init Scale": 1}', "not a plain lowercase name"),
        ('{"x": NaN}', "must be a finite number"),
    ):
        with pytest.raises(WireError, match=why):
            wire.build_request(wire.ENROLL, {**base, "options": bad})

    site = 301
    good = _push(toy, site, wire.ENROLL, {**base, "options": '{"init_scale": 0.5}'})
    assert not good.has_error(), good.error.reason
    assert wire.parse_enroll_reply(good.content).meta["task"] == "toy"
    unknown = _push(toy, site, wire.ENROLL, {**base, "options": '{"depth": 3}'})
    assert unknown.has_error() and "takes no option 'depth' (it takes: init_scale)" in unknown.error.reason
    typed = _push(toy, site, wire.ENROLL, {**base, "options": '{"init_scale": "big"}'})
    assert typed.has_error() and "option 'init_scale'" in typed.error.reason


def _push(toy: dict, node: int, mtype: str, config: dict, run_id: int = 90):
    """One request straight to one site's real ClientApp; its reply."""
    from flwr.app import Message

    from server.messaging import request

    for ctx in toy["nodes"].values():
        ctx.run_id, ctx.run_config = run_id, {}
    grid = LocalGrid(toy["nodes"], run_id)
    req = request("x", node, mtype, config)
    mid = grid.push_messages([Message(req.content, dst_node_id=node, message_type=mtype)])[0]
    return grid.pull_messages([mid])[0]


def test_run_config_family_options_reach_the_site_and_unknown_keys_are_refused(toy, tmp_path):
    """``family-options`` (run config) becomes the ``options`` of the requests the coordinator builds;
    the site takes it; an unknown key is refused at the coordinator, naming it and the known keys."""
    from common.protocol import wire
    from server.modes.enroll import train_config
    from server.settings import Settings, SettingsError

    rc = {"registry-dir": str(tmp_path), "task": "toy", "steps": 2}
    for text in ("init_scale=0.5", '{"init_scale": 0.5}'):
        s = Settings.from_run_config({**rc, "family-options": text})
        config = train_config(s)
        assert json.loads(config["options"]) == {"init_scale": 0.5}
        reply = _push(toy, 301, wire.ENROLL, {"nonce": "m" * 32, **config})
        assert not reply.has_error(), reply.error.reason
    assert "options" not in train_config(Settings.from_run_config(rc))
    with pytest.raises(SettingsError, match=r"takes no option 'depth' \(it takes: init_scale\)"):
        Settings.from_run_config({**rc, "family-options": "depth=3"})
    with pytest.raises(SettingsError, match="option 'init_scale'"):
        Settings.from_run_config({**rc, "family-options": "init_scale=big"})
    with pytest.raises(SettingsError, match="family-options"):
        Settings.from_run_config({**rc, "family-options": "oops"})
