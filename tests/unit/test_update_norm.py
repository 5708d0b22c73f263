"""The ``update-norm`` option (``common/adapters/normalise.py``, issue 28 item 2): each retrieved
adapter's update rescaled to the median norm of the retrieved set before weighting.

1. The maths: the norm is the dense ``‖Σ s B A‖_F``; ``frobenius`` brings every non-zero update to the
   median; ``none`` changes nothing.
2. Exact on both families' real models: the composition with the scales, written as a PEFT directory
   and loaded in stock PEFT (``merge_and_unload``), equals the hand merge ``θ0 + Σ w_i c_i s_i B_i A_i``.
3. Unknown values are refused with the allowed list everywhere a user can give one (run config,
   ``rpe fed run``, ``rpe compose``, ``compose_for_target``), and nothing is written or audited.
4. Local ``rpe compose --update-norm frobenius`` on both families' registries: the ``--json`` reply and
   the ``composition`` audit entry record the mode, norms and scales; ``weights`` stay the strategy's;
   an auditor re-running ``Σ w_i c_i δ_i`` from the registry gets the recorded hash; the default is
   byte-for-byte today's composition.
5. The in-process federation (both families, slow): the compose reply, the audit entry and the
   delivered adapter's provenance carry it, and the delivered adapter is ``Σ w_i c_i δ_i``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support.cli import rpe_run as _rpe
from support.two_family import SEG_DIR, build

from common.adapters import LoraAdapter, LoraModule, adapter_to_bytes, compose, load_peft_adapter, save_peft_adapter
from common.adapters.normalise import UPDATE_NORMS, UpdateNormError, check_update_norm, norm_scaling, update_norm


def _dense(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {n: m.scale * (m.B.double() @ m.A.double()) for n, m in adapter.modules.items()}


def _random(shapes: dict[str, tuple[int, int]], seed: int, rank: int, size: float, scale: float) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            n: LoraModule(torch.randn(rank, i, generator=g) * size, torch.randn(o, rank, generator=g) * size, scale)
            for n, (o, i) in shapes.items()
        }
    )


SHAPES = {"m.q": (12, 10), "m.v": (6, 10), "m.o": (10, 6)}


def test_the_norm_is_the_dense_update_norm_and_frobenius_brings_every_update_to_the_median():
    adapters = [
        _random(SHAPES, i, rank=r, size=s, scale=c)
        for i, (r, s, c) in enumerate([(1, 0.01, 2.0), (2, 0.1, 1.0), (4, 1.0, 0.5), (8, 0.3, 4.0)])
    ]
    for a in adapters:
        dense = torch.sqrt(sum((d**2).sum() for d in _dense(a).values()))
        assert update_norm(a) == pytest.approx(float(dense), rel=1e-9)
    norms = [update_norm(a) for a in adapters]
    assert max(norms) / min(norms) > 100  # a heterogeneous set: 100x apart

    none = norm_scaling(adapters, "none")
    assert none.scales == [1.0] * 4 and none.record() == {"mode": "none"}
    fro = norm_scaling(adapters, "frobenius")
    median = float(np.median(norms))
    assert fro.reference == pytest.approx(median) and fro.norms == pytest.approx(norms)
    rescaled = [n * c for n, c in zip(norms, fro.scales, strict=True)]
    assert rescaled == pytest.approx([median] * 4)
    assert fro.record() == {"mode": "frobenius", "reference": fro.reference, "norms": fro.norms, "scales": fro.scales}
    assert fro.apply([0.5, -1.0, 0.0, 2.0]) == pytest.approx(
        [0.5 * fro.scales[0], -fro.scales[1], 0.0, 2 * fro.scales[3]]
    )

    # an update that is exactly zero (B = 0, PEFT's init) keeps scale 1 and is not in the median
    zero = LoraAdapter({n: LoraModule(m.A, torch.zeros_like(m.B), m.scale) for n, m in adapters[0].modules.items()})
    z = norm_scaling([zero, *adapters[1:]], "FROBENIUS ")
    assert z.scales[0] == 1.0 and z.reference == pytest.approx(norms[2])  # median of the three live norms
    assert norm_scaling([zero, zero], "frobenius").scales == [1.0, 1.0]


@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_the_normalised_composition_is_exact_and_loads_in_stock_peft(family, tiny_model_dir, tmp_path):
    """Heterogeneous ranks, scales and sizes on the family's real (tiny) model: stock PEFT's merge of
    the written adapter equals θ0 + Σ w_i c_i s_i B_i A_i computed densely by hand."""
    from peft import PeftModel
    from support import make_tiny_sam

    from common.families.segmentation import sam
    from common.families.segmentation.task import target_modules

    if family == "report-text":
        from transformers import AutoModelForCausalLM

        def fresh():
            return AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)

        names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    else:

        def fresh():
            return make_tiny_sam(seed=0)

        names = target_modules(fresh(), ("decoder",))[:6]
    base = fresh()
    weights = {n: base.get_submodule(n).weight.detach().double().clone() for n in names}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    adapters = [
        _random(shapes, 10 + i, rank=r, size=s, scale=c)
        for i, (r, s, c) in enumerate([(1, 0.02, 2.0), (2, 0.2, 1.0), (4, 0.05, 0.5)])
    ]
    for a in adapters:
        a.base_model = sam.model_fingerprint(base) if family == "segmentation" else None
    w = [0.6, -0.25, 0.65]
    scaling = norm_scaling(adapters, "frobenius")
    assert max(scaling.scales) / min(scaling.scales) > 10  # the scales really differ
    composed = compose(adapters, scaling.apply(w))
    out = save_peft_adapter(composed, tmp_path / "composed", str(tiny_model_dir))

    merged = PeftModel.from_pretrained(fresh(), str(out)).merge_and_unload()
    for n in names:
        want = weights[n] + sum(wi * ci * _dense(a)[n] for wi, ci, a in zip(w, scaling.scales, adapters, strict=True))
        got = merged.get_submodule(n).weight.detach().double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and without the scales it is a different adapter: the option changes what is delivered
    plain = compose(adapters, w)
    assert not torch.allclose(_dense(plain)[names[0]], _dense(composed)[names[0]])
    assert load_peft_adapter(out).ranks == dict.fromkeys(names, 7)


def test_unknown_values_are_refused_with_the_allowed_list(tmp_path, capsys):
    from deploy.fed import APP_DIR, run_config
    from server.settings import Settings, SettingsError

    for bad in ("l2", "", "Frobenius-module", None, 1):
        with pytest.raises(UpdateNormError) as exc:
            check_update_norm(bad)
        assert "none, frobenius" in str(exc.value)
    assert [check_update_norm(v) for v in (" none", "Frobenius")] == ["none", "frobenius"]
    assert UPDATE_NORMS[0] == "none" and Settings().update_norm == "none"

    # the run config: the ServerApp's parse and `rpe fed run` (before anything is submitted)
    assert Settings.from_run_config({"update-norm": "frobenius", "registry-dir": "/x"}).update_norm == "frobenius"
    with pytest.raises(SettingsError, match=r"update-norm='l2'.*expected one of: none, frobenius"):
        Settings.from_run_config({"update-norm": "l2", "registry-dir": "/x"})
    assert run_config("compose", ["update-norm=frobenius"], APP_DIR)["update-norm"] == "frobenius"
    from common.cli_base import CliError

    with pytest.raises(CliError, match=r"update-norm='l2'.*expected one of: none, frobenius"):
        run_config("compose", ["update-norm=l2"], APP_DIR)
    with pytest.raises(CliError, match="did you mean 'update-norm'"):
        run_config("compose", ["update-nrom=frobenius"], APP_DIR)

    # the default in the pyproject is the Settings default
    import tomllib

    table = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table["update-norm"] == "none"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The two-family registry root (``support.two_family``): adapters of ranks 1-3 and different norms."""
    tmp = tmp_path_factory.mktemp("update-norm")
    return {**build(tmp), "tmp": tmp}


def _audit(reg_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (reg_dir / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("key", ["report", "seg"])
def test_rpe_compose_records_the_scales_and_an_auditor_gets_the_same_hash(tree, key, capsys):
    from server.composer import CompositionError, compose_for_target
    from server.registry import Registry

    reg_dir = tree["root"] / SEG_DIR if key == "seg" else tree["root"]
    with Registry(reg_dir, read_only=True) as reg:
        Z = np.stack([r.z for r in reg.list()]).astype(np.float32)
    z_path = tree["tmp"] / f"{key}-z.npy"
    np.save(z_path, Z.mean(axis=0))
    k = str(min(3, len(Z)))

    def run(tag: str, *extra: str) -> tuple[int, dict, str]:
        code, out, err = _rpe(
            capsys,
            "compose",
            "--registry",
            str(reg_dir),
            "--embedding",
            str(z_path),
            "--k",
            k,
            "--target",
            f"t-{key}-{tag}",
            "--out",
            str(tree["tmp"] / f"out-{key}-{tag}"),
            "--json",
            *extra,
        )
        return code, (json.loads(out) if code == 0 else {}), err

    code, default, _ = run("default")
    assert code == 0 and default["normalisation"] == {"mode": "none"}
    code, none, _ = run("none", "--update-norm", "none")
    assert code == 0 and none["output_sha256"] == default["output_sha256"]  # none is today's composition
    code, fro, _ = run("fro", "--update-norm", "frobenius")
    assert code == 0
    norm = fro["normalisation"]
    assert norm["mode"] == "frobenius" and len(norm["scales"]) == len(fro["retrieved"]) == int(k)
    assert max(norm["norms"]) / min(norm["norms"]) > 1.5 and fro["output_sha256"] != none["output_sha256"]
    assert [r["weight"] for r in fro["retrieved"]] == [r["weight"] for r in none["retrieved"]]  # w_i unchanged

    entry = [e for e in _audit(reg_dir) if e["event"] == "composition" and e["target"] == f"t-{key}-fro"][-1]
    assert entry["normalisation"] == norm and entry["output_sha256"] == fro["output_sha256"]
    assert [e for e in _audit(reg_dir) if e.get("target") == f"t-{key}-none"][-1]["normalisation"] == {"mode": "none"}
    # the auditor: Σ w_i c_i δ_i from the registry's own blobs, with the recorded weights and scales
    with Registry(reg_dir, read_only=True) as reg:
        adapters = [reg.load_adapter(i) for i in entry["retrieved"]]
    again = compose(adapters, [w * c for w, c in zip(entry["weights"], norm["scales"], strict=True)])
    assert hashlib.sha256(adapter_to_bytes(again)).hexdigest() == entry["output_sha256"]
    assert [update_norm(a) * c for a, c in zip(adapters, norm["scales"], strict=True)] == pytest.approx(
        [norm["reference"]] * len(adapters)
    )
    code, out, _ = _rpe(
        capsys,
        "compose",
        "--registry",
        str(reg_dir),
        "--embedding",
        str(z_path),
        "--k",
        k,
        "--out",
        str(tree["tmp"] / f"out-{key}-text"),
        "--update-norm",
        "frobenius",
    )
    assert code == 0 and "update-norm frobenius: scales c_i" in out

    # unknown values: argparse names the choices; the library call names them; nothing is written or audited
    before = (reg_dir / "audit.jsonl").read_bytes()
    code, _, err = run("bad", "--update-norm", "l2")
    assert code == 2 and "invalid choice: 'l2'" in err and "frobenius" in err
    assert not (tree["tmp"] / f"out-{key}-bad").exists()
    with Registry(reg_dir) as reg, pytest.raises(CompositionError, match="expected one of: none, frobenius"):
        compose_for_target(reg, Z.mean(axis=0), k=2, update_norm="l2", out_dir=tree["tmp"] / f"out-{key}-bad2")
    assert (reg_dir / "audit.jsonl").read_bytes() == before and not (tree["tmp"] / f"out-{key}-bad2").exists()
    assert "--update-norm {none,frobenius}" in _rpe(capsys, "compose", "--help")[1]


def test_the_evaluation_report_shows_the_scales():
    from server.reporting import evaluation_row, weights_lines

    info = {"target": "t", "method": "sim", "sites": ["a", "b"], "weights": [0.7, 0.3], "distances": [1.0, 2.0]}
    norm = {"mode": "frobenius", "reference": 2.0, "norms": [1.0, 4.0], "scales": [2.0, 0.5]}
    plain = weights_lines([evaluation_row(info, {"dice": 0.5, "n": 3}, "dice")])
    scaled = weights_lines([evaluation_row({**info, "normalisation": norm}, {"dice": 0.5, "n": 3}, "dice")])
    assert "update-norm" not in "\n".join(plain)
    assert "| t | sim | a: +0.700, b: +0.300; update-norm frobenius, scales c: 2, 0.5 |" in scaled


# ---------------------------------------------------------------------------------------------
# the in-process federation, both families (slow)
# ---------------------------------------------------------------------------------------------


def _add_scaled_sites(registry, template, factors: dict[str, float]) -> None:
    """Sites ``factors`` holding the ``template`` adapter with B scaled by their factor (so their
    update norms differ by that factor), z a little off the template's."""
    adapter = registry.load_adapter(template.id)
    rng = np.random.default_rng(0)
    for name, f in factors.items():
        scaled = LoraAdapter(
            {n: LoraModule(m.A, m.B * f, m.scale) for n, m in adapter.modules.items()}, adapter.base_model
        )
        z = template.z.astype(np.float64) + 1e-3 * rng.normal(size=template.z.shape)
        meta = dataclasses.replace(template.meta, site=name, extra={}, created_at=None, rank=None)
        registry.add(scaled, z.astype(np.float32), meta)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_the_federation_records_and_delivers_the_normalised_composition(local, family):
    from support.seg import report_config, run_local, seg_config

    from server.registry import Registry

    reg_root: Path = local["registry"]
    if family == "report-text":
        rc, reg_dir, target, other, run0 = report_config(local), reg_root, "a", "b", 81
    else:
        rc = seg_config(reg_root, local["sam"], sites="RUNMC,BMC")
        reg_dir, target, other, run0 = reg_root / "segmentation", "RUNMC", "BMC", 91
    assert run_local(local, run0, {**rc, "mode": "enroll"})["status"] == "completed"
    with Registry(reg_dir, chroma="off") as reg:
        rec = {r.meta.site: r for r in reg.list(task=family)}
        _add_scaled_sites(reg, rec[other], {f"{other}-big": 3.0, f"{other}-small": 0.25})

    report = run_local(local, run0 + 1, {**rc, "mode": "compose", "target": target, "k": 3, "update-norm": "frobenius"})
    assert report["status"] == "completed", report.get("error")
    res = report["compose"][target]
    assert res["status"] == "delivered", res
    norm = res["normalisation"]
    assert norm["mode"] == "frobenius" and len(norm["scales"]) == 3
    by_site = dict(zip(res["sites"], norm["scales"], strict=True))
    # the template's norm is the median of {1, 3, 0.25} x itself: its scale is 1, the others 1/3 and 4
    assert by_site[other] == pytest.approx(1.0) and by_site[f"{other}-big"] == pytest.approx(1 / 3, rel=1e-4)
    assert by_site[f"{other}-small"] == pytest.approx(4.0, rel=1e-4)

    entries = [json.loads(x) for x in (reg_dir / "audit.jsonl").read_text().splitlines()]
    entry = [e for e in entries if e["event"] == "composition" and e["target"] == target][-1]
    assert entry["normalisation"] == norm and entry["output_sha256"] == res["blob_sha256"]
    assert entry["weights"] == pytest.approx(res["weights"])
    site_dir = local["tmp"] / "sites" / target / "adapters" / res["adapter_name"]
    provenance = json.loads((site_dir / "rpe-provenance.json").read_text())
    assert json.loads(provenance["normalisation"]) == norm  # the site keeps what it was told

    # what the site installed is Σ w_i c_i δ_i of the retrieved adapters
    delivered = load_peft_adapter(site_dir)
    with Registry(reg_dir, chroma="off", read_only=True) as reg:
        adapters = [reg.load_adapter(i) for i in res["ids"]]
    want = {
        n: sum(w * c * _dense(a)[n] for w, c, a in zip(res["weights"], norm["scales"], adapters, strict=True))
        for n in adapters[0].modules
    }
    got = _dense(delivered)
    for n, d in want.items():
        torch.testing.assert_close(got[n], d, atol=1e-5, rtol=1e-4)

    # and `none` (the default) delivers the plain Σ w_i δ_i, recorded as such
    report = run_local(local, run0 + 2, {**rc, "mode": "compose", "target": target, "k": 3})
    assert report["compose"][target]["normalisation"] == {"mode": "none"}
    assert report["compose"][target]["blob_sha256"] != res["blob_sha256"]
