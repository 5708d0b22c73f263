"""Site tools that cannot mislead (issue 27, item 6): ``rpe site status`` on every adapter a site
received (the real delivery writer), strict JSON, a folder that is not a site refused, ``--dir``;
``rpe generate`` / ``rpe export`` refuse to overwrite without ``--force`` and name the command that
fits an adapter of the other family; ``export --for vllm`` names the exact base weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from support import make_tiny_llama, tiny_adapter

from client.delivery import store_received
from client.egress import EgressLog
from client.export import ExportError, export_vllm
from client.site import Site
from client.use import site_status
from common.adapters import LoraAdapter, LoraModule, save_peft_adapter
from common.families.base import CommandError
from common.families.report import commands as report_commands
from common.families.report.data import Example, write_jsonl
from deploy.cli import main as rpe_main


def _rpe(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rpe_main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    got = capsys.readouterr()
    return code, got.out, got.err


def _seg_adapter() -> LoraAdapter:
    g = torch.Generator().manual_seed(1)
    name = "mask_decoder.transformer.layers.0.self_attn.q_proj"
    return LoraAdapter({name: LoraModule(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0)})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _site(tmp_path) -> Site:
    return Site("t", tmp_path / "data.jsonl", "m", tmp_path / "site-t")


def _deliver(site: Site, adapter, base: str, task: str, name: str, sources, weights) -> None:
    """What ``server/modes/compose.py`` sends: the lists as JSON text in the config record."""
    cfg = {
        "name": name,
        "strategy": "sim",
        "sources": json.dumps(sources),
        "weights": json.dumps(weights),
        "blob_sha256": "ab" * 32,
        "task": task,
    }
    site.adapters_dir.mkdir(parents=True, exist_ok=True)
    store_received(site, cfg, adapter, base)


def test_status_of_a_site_that_received_a_composition_of_each_family(model_dir, tmp_path, capsys):
    """The site that received adapters: ``rpe site status`` crashed (TypeError) because the
    provenance file held the delivery's lists as strings; now lists, for both families."""
    site = _site(tmp_path)
    _deliver(
        site, tiny_adapter(model_dir, 1), str(model_dir), "report-text", "compose-1-sim", ["b:r:1", "c:r:2"], [0.6, 0.4]
    )
    _deliver(site, _seg_adapter(), "litemedsam", "segmentation", "compose-2-sim", ["UCL:s:1"], [1.0])
    prov = json.loads((site.adapters_dir / "compose-1-sim" / "rpe-provenance.json").read_text())
    assert prov["sources"] == ["b:r:1", "c:r:2"] and prov["weights"] == [0.6, 0.4]  # the writer stores lists
    s = site_status(site.site_dir)
    by_name = {a["name"]: a for a in s["adapters"]}
    assert by_name["compose-1-sim"]["sources"] == ["b:r:1", "c:r:2"] and by_name["compose-1-sim"]["weights"] == [
        0.6,
        0.4,
    ]
    assert by_name["compose-2-sim"]["task"] == "segmentation" and by_name["compose-2-sim"]["weights"] == [1.0]
    code, out, err = _rpe(["site", "status", "--site-dir", str(site.site_dir)], capsys)
    assert code == 0, err
    assert "b:r:1 (+0.600), c:r:2 (+0.400)" in out and "UCL:s:1 (+1.000)" in out
    assert "compose-2-sim: received sim (segmentation)" in out


def test_status_reads_provenance_written_before_the_fix(model_dir, tmp_path, capsys):
    site = _site(tmp_path)
    _deliver(site, tiny_adapter(model_dir, 1), str(model_dir), "report-text", "compose-1-sim", ["b:r:1"], [1.0])
    path = site.adapters_dir / "compose-1-sim" / "rpe-provenance.json"
    old = {"strategy": "sim", "sources": '["b:r:1", "c:r:2"]', "weights": "[0.7, 0.3]", "task": "report-text"}
    path.write_text(json.dumps({**old, "blob_sha256": "ab" * 32, "received_at": 1.8e9}))
    (site.adapters_dir / "broken").mkdir()
    save_peft_adapter(tiny_adapter(model_dir, 2), site.adapters_dir / "broken", str(model_dir))
    (site.adapters_dir / "broken" / "rpe-provenance.json").write_text("{not json")
    a = {x["name"]: x for x in site_status(site.site_dir)["adapters"]}
    assert a["compose-1-sim"]["sources"] == ["b:r:1", "c:r:2"] and a["compose-1-sim"]["weights"] == [0.7, 0.3]
    assert "not readable JSON" in a["broken"]["error"]
    code, out, _ = _rpe(["site", "status", "--site-dir", str(site.site_dir)], capsys)
    assert code == 0 and "b:r:1 (+0.700)" in out and "not readable JSON" in out


def test_status_json_is_strict_json(tmp_path, capsys):
    """A non-private release makes ε infinite: ``--json`` printed ``Infinity`` (not JSON); now "inf"."""
    site = tmp_path / "site-a"
    log = EgressLog(site / "egress.jsonl", full_records=("meta",))
    meta = {"site": "a", "privacy": json.dumps({"dp_sgd": False})}
    log.record("query.embed", {"embedding": {"z": np.ones(4, np.float32)}, "meta": meta}, run_id="2")
    code, out, err = _rpe(["site", "status", "--site-dir", str(site), "--json"], capsys)
    assert code == 0, err

    def no_constants(name: str):
        raise AssertionError(f"not JSON: {name}")

    got = json.loads(out, parse_constant=no_constants)
    assert got["epsilon"] == "inf" and got["replies"] == 1
    assert math.isinf(site_status(site)["epsilon"])  # the Python value stays a float


@pytest.mark.parametrize("kind", ["empty", "other-files"])
def test_status_refuses_a_folder_that_is_not_a_site(tmp_path, capsys, kind):
    """It said "sent nothing, ε spent = 0.000" and exit 0 for any folder; now exit 2 and why."""
    folder = tmp_path / "x"
    folder.mkdir()
    if kind == "other-files":
        (folder / "notes.txt").write_text("x")
        (folder / "data").mkdir()
    for flag in ("--site-dir", "--dir"):
        code, out, err = _rpe(["site", "status", flag, str(folder)], capsys)
        assert code == 2 and not out
        assert "is not a site directory" in err and "--site-dir" in err


def test_status_dir_finds_the_site_directory(tmp_path, capsys):
    """``--dir S``: the folder of ``rpe site init``: its node-config.toml's site-dir, else its one site
    under sites/, else itself; several sites are refused with their names."""
    s = tmp_path / "S"
    (s / "keys").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    EgressLog(elsewhere / "egress.jsonl", full_records=()).record("query.whoami", {}, run_id="1")
    (s / "node-config.toml").write_text(f'site-id = "a"\nsite-dir = "{elsewhere}"\n')
    assert site_status(dir_=s)["site_dir"] == str(elsewhere) and site_status(dir_=s)["replies"] == 1
    launch = tmp_path / "L"
    (launch / "sites" / "a").mkdir(parents=True)
    (launch / "sites" / "a" / "node-config.toml").write_text('site-id = "a"\n')
    code, out, err = _rpe(["site", "status", "--dir", str(launch)], capsys)
    assert code == 0 and f"site directory {launch / 'sites' / 'a'}" in out, err
    (launch / "sites" / "b").mkdir()
    (launch / "sites" / "b" / "node-config.toml").write_text('site-id = "b"\n')
    code, _, err = _rpe(["site", "status", "--dir", str(launch)], capsys)
    assert code == 2 and "several sites (a, b)" in err
    code, _, err = _rpe(["site", "status", "--dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err


# -- generate / export: overwrite and the other family ----------------------------------------------
def _reports(tmp_path):
    rows = [Example(f"Heart size normal {i}.", None, "xray-chest", f"r{i}") for i in range(2)]
    return write_jsonl(tmp_path / "new.jsonl", rows)


def test_generate_refuses_to_overwrite_without_force(model_dir, tmp_path, capsys):
    adir = save_peft_adapter(tiny_adapter(model_dir, 3), tmp_path / "adapters" / "compose-1", str(model_dir))
    out = tmp_path / "pred.jsonl"
    out.write_text("keep me\n")
    argv = ["generate", "--adapter", str(adir), "--data", str(_reports(tmp_path)), "--out", str(out)]
    argv += ["--model", str(model_dir), "--max-new-tokens", "3", "--quiet"]
    code, _, err = _rpe(argv, capsys)
    assert code == 2 and "exists" in err and "--force" in err
    assert out.read_text() == "keep me\n"
    code, got, err = _rpe([*argv, "--force"], capsys)
    assert code == 0 and "wrote 2 predictions" in got, err
    assert [json.loads(x)["uid"] for x in out.read_text().splitlines()] == ["r0", "r1"]
    code, _, err = _rpe([*argv[:6], str(tmp_path), *argv[7:]], capsys)  # --out names a directory
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("how", ["provenance", "own-dir", "base-name"])
def test_generate_and_export_name_the_command_for_a_segmentation_adapter(tmp_path, capsys, how):
    from common.families.adapterkind import adapter_family

    name = "own-segmentation" if how == "own-dir" else "compose-9"
    base = "litemedsam" if how == "base-name" else "/somewhere/sam"
    adir = save_peft_adapter(_seg_adapter(), tmp_path / "adapters" / name, base)
    if how == "provenance":
        (adir / "rpe-provenance.json").write_text(json.dumps({"task": "segmentation"}))
    assert adapter_family(adir) == "segmentation"
    out = tmp_path / "pred.jsonl"
    code, _, err = _rpe(
        ["generate", "--adapter", str(adir), "--data", str(_reports(tmp_path)), "--out", str(out)], capsys
    )
    assert code == 2 and "is a segmentation adapter" in err and "rpe segment" in err and not out.exists()
    code, _, err = _rpe(["export", "--for", "vllm", "--adapter", str(adir), "--out", str(tmp_path / "v")], capsys)
    assert code == 2 and "rpe segment" in err and "language models" in err and not (tmp_path / "v").exists()


def test_the_other_way_round_a_report_adapter_names_generate(model_dir, tmp_path):
    from common.families.adapterkind import adapter_family, check_adapter_family

    adir = save_peft_adapter(tiny_adapter(model_dir, 3), tmp_path / "adapters" / "own-report-text", str(model_dir))
    assert adapter_family(adir) == "report-text"
    with pytest.raises(CommandError, match=r"report-text adapter.*rpe generate"):
        check_adapter_family(adir, "segmentation", "segment")
    plain = save_peft_adapter(tiny_adapter(model_dir, 3), tmp_path / "made-elsewhere", str(model_dir))
    assert adapter_family(plain) is None  # nothing says: the command goes on
    check_adapter_family(plain, "report-text", "generate")


def test_export_refuses_to_overwrite_without_force_and_replaces_with_it(model_dir, tmp_path, capsys):
    adir = save_peft_adapter(tiny_adapter(model_dir, 3, rank=3), tmp_path / "a", str(model_dir))
    out = tmp_path / "served"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    argv = ["export", "--for", "vllm", "--adapter", str(adir), "--out", str(out)]
    code, _, err = _rpe(argv, capsys)
    assert code == 2 and "not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["stale.bin"]
    (tmp_path / "file").write_text("x")
    code, _, err = _rpe([*argv[:-1], str(tmp_path / "file")], capsys)
    assert code == 2 and "not a directory" in err
    code, got, err = _rpe([*argv, "--force"], capsys)
    assert code == 0, err
    assert not (out / "stale.bin").exists() and (out / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".served")]  # no temporary left


def test_export_names_the_base_weights_to_serve_with(model_dir, tmp_path, capsys, monkeypatch):
    from common.models import fingerprint

    adir = save_peft_adapter(tiny_adapter(model_dir, 3, rank=3), tmp_path / "a", str(model_dir))
    s = export_vllm(adir, tmp_path / "v1")
    assert s["base_path"] == str(model_dir) and s["base_exists"] and s["base_fingerprint"] == fingerprint(model_dir)
    code, out, _ = _rpe(["export", "--for", "vllm", "--adapter", str(adir), "--out", str(tmp_path / "v2")], capsys)
    assert code == 0 and f"vllm serve {model_dir} --enable-lora" in out and "another θ0" in out
    # the project's base: the de-quantised Q4_1 GGUF, named with where it is and how to make it
    monkeypatch.setenv("RPE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = json.loads((adir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "smollm2-135m-instruct"
    (adir / "adapter_config.json").write_text(json.dumps(cfg))
    code, out, _ = _rpe(["export", "--for", "vllm", "--adapter", str(adir), "--out", str(tmp_path / "v3")], capsys)
    assert code == 0
    assert "Q4_1" in out and "NOT the published" in out and "ensure_smollm2" in out
    assert f"vllm serve {tmp_path / 'cache' / 'smollm2-135m-instruct'} " in out
    with pytest.raises(ExportError, match="not empty"):
        export_vllm(adir, tmp_path / "v3")


def test_generate_reads_a_csv_export(model_dir, tmp_path, capsys):
    """``rpe generate --data`` takes the same CSV a site's data may be (``--columns`` maps it)."""
    adir = save_peft_adapter(tiny_adapter(model_dir, 3), tmp_path / "compose-1", str(model_dir))
    data = tmp_path / "export.csv"
    data.write_text("Accession;Befund;Beurteilung\nA1;Heart normal.;No disease.\nA2;Lungs clear.;\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    argv = ["generate", "--adapter", str(adir), "--data", str(data), "--out", str(out), "--model", str(model_dir)]
    argv += ["--columns", "uid=Accession,prompt=Befund,target=Beurteilung", "--max-new-tokens", "3", "--quiet"]
    code, got, err = _rpe(argv, capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["A1", "A2"] and rows[0]["target"] == "No disease." and "target" not in rows[1]
    code, _, err = _rpe([*argv[:-5], "--columns", "prompt=Findings", "--force", "--quiet"], capsys)
    assert code == 2 and "'Findings'" in err and "Befund" in err
    with pytest.raises(CommandError, match="line 2"):
        report_commands.generate_file(adir, _bad_csv(tmp_path), tmp_path / "o.jsonl", model=str(model_dir))


def _bad_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("findings,impression,group\n,x,g\n")
    return p


def test_status_on_a_site_after_a_real_delivery(toy, capsys):
    """Through the real ServerApp and ClientApp: enrol, compose for h1, then ``rpe site status`` at h1
    (it raised TypeError there: the provenance held the delivery's lists as text)."""
    from support.toy import SITES, run

    enrolled = run(toy, 61, mode="enroll", sites=",".join(SITES))
    assert {r["status"] for r in enrolled["enroll"].values()} == {"accepted"}, enrolled
    out = run(toy, 62, mode="compose", target="h1", k=2, strategy="sim")["compose"]["h1"]
    assert out["status"] == "delivered", out
    site_dir = toy["tmp"] / "sites" / "h1"
    capsys.readouterr()  # the run's own output
    code, text, err = _rpe(["site", "status", "--site-dir", str(site_dir)], capsys)
    assert code == 0, err
    assert f"adapter {out['adapter_name']}: received sim (toy)" in text and " from " in text
    code, text, err = _rpe(["site", "status", "--site-dir", str(site_dir), "--json"], capsys)
    assert code == 0, err
    got = {a["name"]: a for a in json.loads(text)["adapters"]}[out["adapter_name"]]
    assert got["kind"] == "received" and got["task"] == "toy" and len(got["sources"]) == 2
    assert all(isinstance(w, float) for w in got["weights"]) and abs(sum(got["weights"]) - 1.0) < 1e-6


def test_force_never_replaces_the_input(model_dir, tmp_path, capsys):
    """``--force`` replaces an earlier output, never what the command reads: the reports file of
    ``generate``, or a folder holding the adapter (``export --out adapters/ --force`` would delete them)."""
    adapters = tmp_path / "adapters"
    adir = save_peft_adapter(tiny_adapter(model_dir, 3), adapters / "compose-1", str(model_dir))
    data = _reports(tmp_path)
    before = data.read_bytes()
    code, _, err = _rpe(
        ["generate", "--adapter", str(adir), "--data", str(data), "--out", str(data), "--force"], capsys
    )
    assert code == 2 and "is the --data file" in err and data.read_bytes() == before
    for out in (adapters, tmp_path, adir / "inside"):
        code, _, err = _rpe(["export", "--for", "vllm", "--adapter", str(adir), "--out", str(out), "--force"], capsys)
        assert code == 2 and "must differ from --adapter" in err
    assert (adir / "adapter_config.json").is_file() and (adir / "adapter_model.safetensors").is_file()
