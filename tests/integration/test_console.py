"""The web console, driven in a real browser (headless Debian chromium via Playwright).

The test builds a registry with the real components (Registry, composer, audit log, a site's
EgressLog, the ServerApp's evaluation writer), starts ``python -m server.console`` as its own
process on a free 127.0.0.1 port, clicks through every page and checks that the numbers shown
equal what the library says (Registry, server.audit.verify, common.privacy.spent_from_egress).
Screenshots go to ``runs/test-artifacts/console/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from support.console import BASE, DIM, SHAPES, Console, _adapter, _go

from client.egress import EgressLog
from common.adapters import adapter_to_arrays
from common.privacy import spent_from_egress, with_total
from common.trust.digests import record_digests
from server.audit import verify
from server.composer import compose_for_target
from server.registry import AdapterMeta, Registry

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts" / "console"
SITES = {"xray": ("xray-chest", 3), "ct": ("ct-head", 2), "mr": ("mr-head", 2)}
PRIVATE = with_total(
    {
        "dp_sgd": True,
        "epsilon": 3.0,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "steps": 30,
        "z_mechanism": "gaussian",
        "z_clip": 1.0,
        "z_noise_multiplier": 4.0,
        "z_epsilon": 1.2,
        "z_delta": 1e-5,
    },
    adapter_sent=True,
)


def build_registry(root: Path) -> dict:
    """Three sites (one with DP), an egress log for site 'xray', two compositions and one evaluation run."""
    rng = np.random.default_rng(7)
    reg = Registry.init(
        root / "reg",
        base_fingerprint=BASE,
        module_shapes=SHAPES,
        embedding_dim=DIM,
        base_name="tiny-base",
        chroma_host=None,
    )
    egress = EgressLog(root / "site-xray" / "egress.jsonl", full_records=("meta",))
    seed = 0
    centres = {s: rng.standard_normal(DIM) * 3 for s in SITES}
    for site, (task, n) in SITES.items():
        for i in range(n):
            seed += 1
            adapter, z = _adapter(seed), (centres[site] + 0.2 * rng.standard_normal(DIM)).astype(np.float32)
            privacy = PRIVATE if site == "xray" else "none"
            meta = AdapterMeta(
                site=site, task=task, modality="text", base_fingerprint=BASE, sample_count=10 + seed, privacy=privacy
            )
            audit_fields = {}
            if site == "xray":  # as the ClientApp does it: log the reply, the coordinator logs its digests
                arrays, _ = adapter_to_arrays(adapter)
                reply = {
                    "adapter": arrays,
                    "embedding": {"z": z},
                    "meta": {"site": site, "task": task, "privacy": json.dumps(PRIVATE)},
                }
                egress.record("train", reply, run_id=f"run-{i}", extra={"outcome": "ok", "nonce": f"n{i}"})
                audit_fields = {
                    "run_id": f"run-{i}",
                    "nonce": f"n{i}",
                    "record_digests": record_digests(reply),
                    "message_type": "train",
                }
            reg.add(adapter, z, meta, audit_fields=audit_fields)
    compositions = []
    for target, strategy in (("mr", "sim"), ("ct", "lin")):
        z_t = centres[target] + 0.1
        res = compose_for_target(
            reg,
            z_t,
            strategy=strategy,
            k=3,
            exclude_site=target,
            out_dir=root / f"out-{target}",
            target=target,
            one_per_site=False,  # the library holds several records per site: the pages show all three
        )
        compositions.append(res)
    # one leave-one-site-out evaluation, written by the ServerApp's own writer
    from server.app import write_evaluation

    rows = []
    for t in SITES:
        for j, method in enumerate(["base", "sim", "own"]):
            rows.append(
                {
                    "target": t,
                    "method": method,
                    "rouge_l": round(0.05 + 0.01 * j + 0.001 * len(t), 4),
                    "n": 12,
                    "sources": [] if method == "base" else [s for s in SITES if s != t][:2],
                    "weights": [] if method == "base" else [0.6, 0.4],
                    "distances": [] if method == "base" else [1.5, 2.5],
                    "metrics": {},
                }
            )
    write_evaluation(reg.path / "evaluations" / "run-42", rows, reg, {t: centres[t] for t in SITES})
    info = {
        "records": [r.to_dict() for r in reg.list()],
        "compositions": compositions,
        "path": reg.path,
        "egress": egress.path,
    }
    reg.close()
    return info


def tree_hash(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("console"))


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _image_ok(page, selector: str) -> None:
    """Wait until the image(s) matching ``selector`` are decoded (a click only waits for the navigation to start)."""
    page.wait_for_load_state("load")
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(i => i.complete && i.naturalWidth > 0)",
        arg=selector,
        timeout=120_000,
    )


def _num(text: str) -> float:
    return math.inf if text.strip() == "∞" else float(text.replace(",", ""))


@pytest.mark.integration
@pytest.mark.slow
def test_console_pages_show_the_registry(browser, built, tmp_path):
    reg_path: Path = built["path"]
    before = tree_hash(reg_path)
    console = Console(reg_path, tmp_path / "console.log")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)  # the 2-core CI machine can be loaded
        reg = Registry(reg_path, read_only=True)

        # overview: counts per site, audit status, registry size
        page.goto(console.url + "/")
        assert int(page.inner_text("#n-records")) == len(reg) == 7
        assert int(page.inner_text("#n-sites")) == 3
        for site, n in reg.distinct("site").items():
            assert int(page.inner_text(f"#sites tr[data-site='{site}'] .adapters")) == n
        assert "chain intact" in page.inner_text("#audit-status")
        assert int(page.inner_text("#audit-entries")) == sum(1 for _ in open(reg_path / "audit.jsonl"))
        _shot(page, "overview")

        # registry: filter by site, then open a record
        _go(page, "#nav-registry")
        assert int(page.inner_text("#n-shown")) == 7
        page.select_option("#filter-site", "ct")
        _go(page, "#filter-apply")
        page.wait_for_url("**site=ct**")
        shown = page.locator("#records tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
        assert shown == [r.id for r in reg.list(site="ct")]
        _image_ok(page, "#pca-map")
        _go(page, "#sort-samples")
        _go(page, "#sort-samples")  # second click: descending
        samples = [int(t) for t in page.locator("#records tbody td.samples").all_inner_texts()]
        assert samples == sorted((r.meta.sample_count for r in reg.list(site="ct")), reverse=True)
        page.goto(console.url + "/registry?colour=task")
        _image_ok(page, "#pca-map")
        _shot(page, "registry")
        rec = reg.list(site="xray")[0]
        _go(page, f"#records tr[data-id='{rec.id}'] a.record-link")
        assert page.inner_text("#record-id") == rec.id
        assert page.inner_text("#rec-blob") == rec.blob_sha256
        assert int(page.inner_text("#rec-bytes")) == rec.bytes
        assert int(page.inner_text("#rec-samples")) == rec.meta.sample_count
        assert page.inner_text("#rec-z-sha") == rec.z_sha256
        assert float(page.inner_text("#rec-znorm")) == pytest.approx(float(np.linalg.norm(rec.z)), rel=1e-5)
        assert float(page.inner_text("#rec-epsilon")) == pytest.approx(PRIVATE["epsilon_total"], rel=1e-3)
        assert json.loads(page.inner_text("#rec-privacy"))["noise_multiplier"] == PRIVATE["noise_multiplier"]
        _shot(page, "record")

        # an unknown id: a clear message, status 404
        resp = page.goto(console.url + "/registry/record/nope:x:0")
        assert resp.status == 404 and "no live record 'nope:x:0'" in page.inner_text("#error-message")

        # compositions: the list, then one: distances, weights and output hash equal the audit log's
        _go(page, "#nav-compositions")
        assert int(page.inner_text("#n-compositions")) == 2
        res = built["compositions"][1]
        seq = page.locator("#compositions tbody tr").nth(1).get_attribute("data-seq")
        _go(page, f"#compositions tr[data-seq='{seq}'] a.composition-link")
        assert page.inner_text("#comp-target") == "ct" and page.inner_text("#comp-strategy") == "lin"
        assert page.inner_text("#comp-output") == res.output_sha256
        ids = page.locator("#retrieved tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")
        assert ids == list(res.ids)
        np.testing.assert_allclose(
            [float(t) for t in page.locator("#retrieved td.weight").all_inner_texts()],
            res.weights,
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            [float(t) for t in page.locator("#retrieved td.distance").all_inner_texts()], res.distances, rtol=1e-5
        )
        _image_ok(page, "#weights-chart")
        _shot(page, "composition")

        # audit: verify result, per-site report, cross-check of the site's real egress log
        _go(page, "#nav-audit")
        assert "OK: hash chain intact" in page.inner_text("#verify-result")
        assert int(page.inner_text("#report-sites tr[data-site='xray'] .accepted")) == 3
        page.fill("#crosscheck-site", "xray")
        page.set_input_files("#crosscheck-file", str(built["egress"]))
        _go(page, "#crosscheck-submit")
        assert page.inner_text("#crosscheck-status") == "OK"
        assert int(page.inner_text("#crosscheck-matched")) == 3
        _shot(page, "audit")
        # a malformed upload: a clear error and nothing changes
        bad = tmp_path / "not-egress.jsonl"
        bad.write_text('{"v": 1, "records": [\n')
        page.fill("#crosscheck-site", "xray")
        page.set_input_files("#crosscheck-file", str(bad))
        _go(page, "#crosscheck-submit")
        msg = page.inner_text("#upload-error")
        assert "not-egress.jsonl: line 1 is not JSON" in msg and "egress log" in msg
        _shot(page, "audit-bad-upload")
        # a huge file: refused before it is read
        huge = tmp_path / "huge.jsonl"
        huge.write_bytes(b"{}\n" * (3 * 1024 * 1024))
        page.fill("#crosscheck-site", "xray")
        page.set_input_files("#crosscheck-file", str(huge))
        _go(page, "#crosscheck-submit")
        assert "the console accepts egress logs up to" in page.inner_text("#upload-error")

        # privacy: recorded releases, then the site's egress log -> ε equal to spent_from_egress
        _go(page, "#nav-privacy")
        assert int(page.inner_text("#recorded tr[data-site='ct'] .non-private")) == 2  # its two adapters
        assert int(page.inner_text("#recorded tr[data-site='ct'] .queries")) == 1  # the composition's query
        assert int(page.inner_text("#recorded tr[data-site='xray'] .non-private")) == 0
        page.fill("#privacy-site", "xray")
        page.set_input_files("#privacy-file", str(built["egress"]))
        _go(page, "#privacy-submit")
        lines = [json.loads(x) for x in built["egress"].read_text().splitlines()]
        want = spent_from_egress(lines)
        assert _num(page.inner_text(".spent[data-site='xray'] .epsilon")) == pytest.approx(want.epsilon, rel=1e-3)
        assert int(page.inner_text(".spent[data-site='xray'] .n-releases")) == len(want.releases) == 3
        _shot(page, "privacy")

        # evaluations: the table and the means equal the run's results.csv
        _go(page, "#nav-evaluations")
        _go(page, "a.run-link")
        assert page.inner_text("#eval-table tr[data-target='ct'] td[data-method='sim']") == "0.062"
        assert page.locator("img.eval-plot").count() >= 1
        _image_ok(page, "img.eval-plot")
        _shot(page, "evaluation")
        resp = page.goto(console.url + "/evaluations/run-42/files/..%2F..%2Fregistry.json")
        assert resp.status == 404

        # nothing the console did changed the registry directory
        assert tree_hash(reg_path) == before
        page.goto(console.url + "/")
        _shot(page, "overview-final")
        readme_shot = ROOT / "docs" / "console.png"  # the README's screenshot: refreshed on request only
        if os.environ.get("RPE_UPDATE_DOCS") == "1" or not readme_shot.exists():
            shutil.copy(ARTIFACTS / "registry.png", readme_shot)

        # an auditor's view of a tampered log: the exact line and kind, as verify() says
        audit = reg_path / "audit.jsonl"
        text = audit.read_text().splitlines()
        text[2] = text[2].replace('"bytes":', '"bytes":1', 1)
        audit.write_text("\n".join(text) + "\n")
        _go(page, "#nav-audit")
        want_problems = verify(audit)
        rows = page.locator("#problems tbody tr")
        assert rows.count() == len(want_problems) >= 2
        assert [
            (int(rows.nth(i).locator(".line").inner_text()), rows.nth(i).locator(".kind").inner_text())
            for i in range(rows.count())
        ] == [(p.line, p.kind) for p in want_problems]
        assert (want_problems[0].line, want_problems[0].kind) == (3, "bad_hash")
        _shot(page, "audit-tampered")
        reg.close()
    finally:
        console.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_console_token_required_when_configured(browser, built, tmp_path):
    token_file = tmp_path / "console.token"
    console = Console(built["path"], tmp_path / "console.log", "--token-file", str(token_file))
    try:
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) >= 32
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(console.url + "/registry", timeout=30)
        assert err.value.code == 401
        req = urllib.request.Request(console.url + "/registry", headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(req, timeout=30).status == 200
        page = browser.new_page()
        page.set_default_timeout(120_000)
        assert page.goto(console.url + "/?token=wrong").status == 401
        page.goto(console.url + "/registry?token=" + token)
        assert "token=" not in page.url and page.inner_text("#n-total") == "7"  # cookie set, token left the URL
        _go(page, "#nav-audit")  # later pages need no token in the URL
        assert page.title().startswith("Audit") and page.locator("#verify-result").count() == 1
    finally:
        console.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_console_over_tls_with_token(built, tmp_path):
    """The configuration for a non-loopback host (TLS + token), exercised on 127.0.0.1 with real certificates."""
    import ssl

    from deploy.tls import generate

    bundle = generate(tmp_path / "tls", sites=[])
    token_file = tmp_path / "tok"
    console = Console(
        built["path"],
        tmp_path / "console.log",
        "--certfile",
        str(bundle.server_cert),
        "--keyfile",
        str(bundle.server_key),
        "--token-file",
        str(token_file),
    )
    try:
        ctx = ssl.create_default_context(cafile=str(bundle.ca_cert))
        url = f"https://127.0.0.1:{console.port}/"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, context=ctx, timeout=30)
        assert err.value.code == 401
        token = token_file.read_text().strip()
        resp = urllib.request.urlopen(
            urllib.request.Request(url, headers={"X-RPE-Token": token}), context=ctx, timeout=30
        )
        assert resp.status == 200 and b"live adapters" in resp.read()
        with pytest.raises(OSError):  # plain HTTP is not served (URLError or a dropped connection)
            urllib.request.urlopen(f"http://127.0.0.1:{console.port}/", timeout=10)
    finally:
        console.stop()


# --------------------------------------------------------------------------------------------------
# every family: the console pointed at a coordinator root with the report and segmentation families


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    from support.two_family import build

    return build(tmp_path_factory.mktemp("console-two-families"))


@pytest.mark.integration
@pytest.mark.slow
def test_console_shows_every_family_with_its_metric(browser, two_families, tmp_path):
    """The root holds the report family's registry and ``segmentation/``: the overview counts both
    families' adapters, every page names the families, the evaluation pages show the DICE table and
    the ROUGE-L table with the numbers of each family's results.csv, and damage in the segmentation
    family's audit log is named on the audit page."""
    from support.two_family import FAMILIES, METHODS, accepted_line, score, tamper_line

    from server.coordroot import family_registries

    root: Path = two_families["root"]
    fams = family_registries(root)
    name = {key: next(f for f, d in fams.items() if d == two_families["dirs"][key]) for key in FAMILIES}
    regs = {key: Registry(two_families["dirs"][key], read_only=True) for key in FAMILIES}
    before = tree_hash(root)
    console = Console(root, tmp_path / "console.log")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)

        def families_named() -> None:  # the family strip on every page
            shown = page.locator("#families .family").evaluate_all("xs => xs.map(x => x.dataset.family)")
            assert shown == list(fams)

        # overview: every family's adapters, per family and per site
        page.goto(console.url + "/")
        families_named()
        assert int(page.inner_text("#n-records")) == sum(len(r) for r in regs.values()) == 7
        for key, reg in regs.items():
            assert int(page.inner_text(f"#family-table tr[data-family='{name[key]}'] .adapters")) == len(reg)
            for site in FAMILIES[key]["sites"]:
                n = int(page.inner_text(f"#sites tr[data-site='{site}'] .families [data-family='{name[key]}'] .n"))
                assert n == len(reg.list(site=site)) == 1
        assert int(page.inner_text("#sites tr[data-site='a'] .adapters")) == 2  # a answered both families
        assert int(page.inner_text("#sites tr[data-site='RUNMC'] .adapters")) == 1  # a prostate site, not 0
        assert int(page.inner_text("#n-sites")) == 6 + 2  # and each composition's target (its z query)
        assert "chain intact" in page.inner_text("#audit-status")
        _shot(page, "families-overview")

        # registry: both families' records, one map each; filtered to segmentation
        _go(page, "#nav-registry")
        families_named()
        assert int(page.inner_text("#n-shown")) == 7
        assert page.locator("img.pca-map").count() == 2
        _image_ok(page, "img.pca-map")
        page.select_option("#filter-family", name["seg"])
        _go(page, "#filter-apply")
        shown = page.locator("#records tbody tr").evaluate_all(
            "rows => rows.map(r => [r.dataset.family, r.dataset.id])"
        )
        assert sorted(shown) == sorted([name["seg"], r.id] for r in regs["seg"].list())
        assert page.locator("img.pca-map").count() == 1
        _image_ok(page, "img.pca-map")
        rec = regs["seg"].list(site="RUNMC")[0]
        _go(page, f"#records tr[data-id='{rec.id}'] a.record-link")
        families_named()
        assert page.inner_text("#rec-family") == name["seg"] and page.inner_text("#rec-blob") == rec.blob_sha256
        assert int(page.inner_text("#rec-dim")) == 256

        # compositions: one per family, each opened from its own family's log
        _go(page, "#nav-compositions")
        families_named()
        assert int(page.inner_text("#n-compositions")) == 2
        for key in FAMILIES:
            _go(page, "#nav-compositions")
            res = two_families["compositions"][key]
            _go(page, f"#compositions tr[data-family='{name[key]}'] a.composition-link")
            assert page.inner_text("#comp-family") == name[key]
            assert page.inner_text("#comp-output") == res.output_sha256
            assert page.locator("#retrieved tbody tr").evaluate_all("rs => rs.map(r => r.dataset.id)") == list(res.ids)
            _image_ok(page, "#weights-chart")

        # audit: both chains intact; a's egress log cross-checks OK over both families' logs
        _go(page, "#nav-audit")
        families_named()
        assert "OK: hash chain intact" in page.inner_text("#verify-result")
        assert page.locator("#family-audit tbody tr").count() == 2
        assert int(page.inner_text(f"#report-sites tr[data-site='RUNMC'][data-family='{name['seg']}'] .accepted")) == 1
        page.fill("#crosscheck-site", "a")
        page.set_input_files("#crosscheck-file", str(two_families["egress"]))
        _go(page, "#crosscheck-submit")
        assert page.inner_text("#crosscheck-status") == "OK", page.inner_text("#crosscheck-result")
        assert int(page.inner_text("#crosscheck-matched")) == 2
        _shot(page, "families-audit")

        # privacy: a's releases in both families
        _go(page, "#nav-privacy")
        families_named()
        assert int(page.inner_text("#recorded tr[data-site='a'] .adapters")) == 2
        assert page.inner_text("#recorded tr[data-site='RUNMC'] .families") == name["seg"]

        # evaluations: the DICE table and the ROUGE-L table show results.csv's numbers
        titles = {"report": "ROUGE-L", "seg": "DICE"}
        for key, spec in FAMILIES.items():
            _go(page, "#nav-evaluations")
            families_named()
            assert page.locator("a.run-link").count() == 2
            _go(page, f"a.run-link[data-family='{name[key]}']")
            families_named()
            assert page.inner_text("#eval-family") == name[key]
            assert titles[key] in page.inner_text("#eval-metric")
            assert page.inner_text("#eval-metric").count("ROUGE") == (key == "report")
            heads = page.locator("#eval-rows th.metric").all_inner_texts()
            assert len(heads) == 1 and titles[key] in heads[0]
            for t in spec["sites"]:
                for m in METHODS:
                    cell = page.inner_text(f"#eval-table tr[data-target='{t}'] td[data-method='{m}']")
                    assert float(cell) == pytest.approx(score(key, t, m), abs=5e-5), (key, t, m, cell)
            mean = float(page.inner_text("#eval-table td.mean[data-method='sim']"))
            assert mean == pytest.approx(np.mean([score(key, t, "sim") for t in spec["sites"]]), rel=1e-3)
            raw = page.locator(f"#eval-rows td[data-metric='{spec['metric']}']").all_inner_texts()
            assert raw == [f"{score(key, t, m):.4f}" for t in spec["sites"] for m in METHODS]
            _shot(page, f"families-evaluation-{key}")

        assert tree_hash(root) == before  # the console changed nothing in any family's registry

        # damage in the segmentation family's audit log: named with its family, line and kind
        log = two_families["dirs"]["seg"] / "audit.jsonl"
        i = accepted_line(log, "HK")
        tamper_line(log, i, '"bytes":', '"bytes":1')
        _go(page, "#nav-audit")
        assert "BROKEN" in page.inner_text("#verify-result") and name["seg"] in page.inner_text("#verify-result")
        want = verify(log)
        rows = page.locator("#problems tbody tr")
        got = [
            (
                rows.nth(k).get_attribute("data-family"),
                int(rows.nth(k).locator(".line").inner_text()),
                rows.nth(k).locator(".kind").inner_text(),
            )
            for k in range(rows.count())
        ]
        assert got == [(name["seg"], p.line, p.kind) for p in want] and got[0][1:] == (i + 1, "bad_hash")
        assert "OK" in page.inner_text(f"#family-audit tr[data-family='{name['report']}'] .status")
        page.goto(console.url + "/")
        assert "problem" in page.inner_text("#audit-status")
        _shot(page, "families-audit-tampered")
    finally:
        console.stop()
        for reg in regs.values():
            reg.close()
