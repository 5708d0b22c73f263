"""``rpe data check`` (issue 27, item 5): what each task family of a site would use of its data,
a clean case and each kind of damage, for both families, for a family without ``check_data``
(counts only), from a node config or a data path; exit 0 usable, 1 a problem, 2 bad usage;
``--json``; nothing written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from common.dataroot import data_root
from common.families import FAMILIES
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


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _clean_site(root: Path) -> Path:
    site = root / "site"
    site.mkdir(parents=True)
    train = [Example(f"Lungs clear, finding {i}.", f"Normal {i}.", "xray-chest", f"t{i}") for i in range(12)]
    write_jsonl(site / "eval.jsonl", [Example(f"Effusion {i}.", "Effusion.", "xray-chest", f"e{i}") for i in range(10)])
    rows = "".join(f"{e.uid};{e.prompt};{e.target};{e.group}\n" for e in train)
    (site / "train.csv").write_text("Accession;Befund;Beurteilung;Gruppe\n" + rows, encoding="utf-8")
    write_jsonl(site / "unlabeled.jsonl", [Example("Nodule.", None, "ct-thorax", "u1")])
    return site


COLUMNS = "report-columns=uid=Accession,prompt=Befund,target=Beurteilung,group=Gruppe"


def test_a_clean_report_site_prints_what_would_be_used(tmp_path, capsys):
    site = _clean_site(tmp_path)
    before = _tree(tmp_path)
    code, out, err = _rpe(["data", "check", "--data-path", str(site), "--option", COLUMNS], capsys)
    assert code == 0, out + err
    assert f"report-text: {site}: ok" in out and "would use: 12 train, 10 eval, 1 unlabeled" in out
    assert "train.csv (CSV (semicolon-separated), prompt='Befund', target='Beurteilung'" in out
    assert "groups: xray-chest 22, ct-thorax 1" in out and "problem" not in out
    code, out, _ = _rpe(["data", "check", "--data-path", str(site), "--option", COLUMNS, "--json"], capsys)
    got = json.loads(out)
    assert code == 0 and got["ok"] and got["checks"][0]["used"] == {"train": 12, "eval": 10, "unlabeled": 1}
    assert got["checks"][0]["family"] == "report-text" and got["checks"][0]["problems"] == []
    assert _tree(tmp_path) == before  # nothing written


def _damage(site: Path, kind: str) -> tuple[list[str], str]:
    """Damage the clean site one way; the extra options and the problem text expected."""
    if kind == "bad-json":
        with open(site / "eval.jsonl", "a") as fh:
            fh.write("{not json\n")
        return [], r"eval.jsonl: line 11: expected one JSON object per line"
    if kind == "unknown-key":
        with open(site / "eval.jsonl", "a") as fh:
            fh.write('{"prompt": "p", "targt": "t", "group": "g"}\n')
        return [], r"eval.jsonl: line 11: unknown keys \['targt'\]"
    if kind == "empty-findings":
        with open(site / "train.csv", "a") as fh:
            fh.write("t99;;Normal.;xray-chest\n")
        return [], r"train.csv: row at line 14: the findings cell \('Befund'\) is empty"
    if kind == "two-files-one-split":
        (site / "eval.csv").write_text("findings,group\nx,g\n")
        return [], r"both eval.jsonl and eval.csv"
    if kind == "mapped-column-missing":
        return ["--option", "report-columns=prompt=Findings"], r"maps prompt to column 'Findings'.*Befund"
    if kind == "missing-path":
        return ["--data-path", str(site / "nope")], r"nope: does not exist"
    if kind == "no-reports":
        for p in site.iterdir():
            p.write_text("")
        (site / "train.csv").unlink()
        return [], r"holds no reports"
    raise AssertionError(kind)


DAMAGE = [
    "bad-json",
    "unknown-key",
    "empty-findings",
    "two-files-one-split",
    "mapped-column-missing",
    "missing-path",
    "no-reports",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_kind_of_damage_exits_1_naming_file_and_row(tmp_path, capsys, kind):
    site = _clean_site(tmp_path)
    extra, match = _damage(site, kind)
    argv = ["data", "check", "--data-path", str(site), "--option", COLUMNS, *extra]
    before = _tree(tmp_path)
    code, out, err = _rpe(argv, capsys)
    assert code == 1, out + err
    problems = [ln for ln in out.splitlines() if ln.strip().startswith("problem:")]
    assert problems and any(re.search(match, p) for p in problems), out
    code, out, _ = _rpe([*argv, "--json"], capsys)
    assert code == 1 and not json.loads(out)["ok"]
    assert _tree(tmp_path) == before


def test_warnings_do_not_fail_the_check(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    rows = [Example("Clear.", "Normal.", "g", "same") for _ in range(3)]
    write_jsonl(site / "train.jsonl", rows)
    write_jsonl(site / "unlabeled.jsonl", [Example("Nodule.", "Labeled by mistake.", "g", "u1")])
    (site / "notes.docx").write_text("x")
    code, out, err = _rpe(["data", "check", "--data-path", str(site)], capsys)
    assert code == 0, out + err
    warnings = "\n".join(ln for ln in out.splitlines() if "warning:" in ln)
    assert "uid(s) appear more than once" in warnings
    assert "unlabeled.jsonl: 1 row(s) have a target and are NOT used" in warnings
    assert "no eval file" in warnings and "notes.docx" in warnings
    assert "z-min-examples = 10" in warnings  # 3 reports: the site's release policy would refuse z
    nc = tmp_path / "node-config.toml"
    nc.write_text(f'site-id = "a"\ndata-path = "{site}"\nz-min-examples = 2\n')
    code, out, _ = _rpe(["data", "check", "--node-config", str(nc)], capsys)
    assert code == 0 and "z-min-examples" not in out  # the node config's own policy is applied
    only_findings = tmp_path / "f.jsonl"
    write_jsonl(only_findings, [Example(f"F{i}.", None, "g", f"f{i}") for i in range(12)])
    code, out, _ = _rpe(["data", "check", "--data-path", str(only_findings)], capsys)
    assert code == 0 and "would use: 0 train, 0 eval, 12 unlabeled" in out
    assert "every report is unlabeled" in out
    labeled_file = tmp_path / "l.jsonl"
    write_jsonl(labeled_file, [Example(f"F{i}.", "I.", "g", f"l{i}") for i in range(12)])
    code, out, _ = _rpe(["data", "check", "--data-path", str(labeled_file)], capsys)
    assert code == 0 and "one file holds no held-out split" in out


def test_a_node_config_of_both_families(tmp_path, capsys):
    """One node config with task = both families: each checked with its own keys."""
    site = _clean_site(tmp_path)
    nc = tmp_path / "node-config.toml"
    seg_root = data_root()
    nc.write_text(
        f'site-id = "a"\ndata-path = "{site}"\ntask = "report-text"\nreport-columns = "{COLUMNS.split("=", 1)[1]}"\n'
    )
    code, out, err = _rpe(["data", "check", "--node-config", str(nc)], capsys)
    assert code == 0 and "would use: 12 train, 10 eval, 1 unlabeled" in out, out + err
    seg_nc = tmp_path / "seg.toml"
    seg_nc.write_text(f'site-id = "b"\ndata-path = "{seg_root}"\ntask = "segmentation"\nseg-site = "RUNMC"\n')
    code, out, err = _rpe(["data", "check", "--node-config", str(seg_nc), "--json"], capsys)
    got = json.loads(out)
    assert code == 0 and got["ok"], out + err
    (check,) = got["checks"]
    assert check["family"] == "segmentation" and check["used"]["train"] > 0 and check["used"]["eval"] > 0
    seg_nc.write_text(f'site-id = "b"\ndata-path = "{seg_root}"\ntask = "segmentation"\nseg-site = "NOPE"\n')
    code, out, _ = _rpe(["data", "check", "--node-config", str(seg_nc)], capsys)
    assert code == 1 and "segmentation:" in out and "problem:" in out
    # both families of one site from one node config: the report family reads data-path, the
    # segmentation family names no set there, so it is a problem for it and the check exits 1
    nc.write_text(f'site-id = "a"\ndata-path = "{site}"\ntask = "report-text,segmentation"\n')
    code, out, _ = _rpe(["data", "check", "--node-config", str(nc), "--option", COLUMNS], capsys)
    assert "report-text:" in out and "segmentation:" in out and code == 1


def test_a_family_without_check_data_gives_its_counts(tmp_path, capsys, monkeypatch):
    from support.families.toy import write_toy_site

    monkeypatch.setitem(FAMILIES, "toy", "support.families.toy:FAMILY")
    data = write_toy_site(tmp_path / "toy", seed=3)
    code, out, err = _rpe(["data", "check", "--data-path", str(data), "--family", "toy"], capsys)
    assert code == 0, out + err
    assert "toy:" in out and "counts only" in out and "would use:" in out
    (data / "train.jsonl").write_text("{broken\n")
    (data / "eval.jsonl").unlink(missing_ok=True)
    code, out, _ = _rpe(["data", "check", "--data-path", str(data), "--family", "toy"], capsys)
    assert code == 1 and "problem:" in out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--data-path", "x", "--family", "reports"], r"unknown family 'reports'.*report-text"),
        (["--data-path", "x", "--option", "report-colums=a=b"], r"did you mean 'report-columns'"),
        (["--data-path", "x", "--option", "report-columns"], r"not KEY=VALUE"),
        (["--node-config", "/nonexistent/nc.toml"], r"no such file"),
        ([], r"one of the arguments --node-config --data-path is required"),
        (["--data-path", "x", "--node-config", "y"], r"not allowed with argument"),
    ],
    ids=["family", "option-key", "option-form", "no-node-config", "neither", "both"],
)
def test_bad_usage_exits_2(tmp_path, capsys, argv, match):
    code, out, err = _rpe(["data", "check", *argv], capsys)
    assert code == 2 and re.search(match, err), err


def test_bad_node_configs_exit_2(tmp_path, capsys):
    nc = tmp_path / "nc.toml"
    for text, match in [
        ('site-id = "a"\n', "no 'data-path' key"),
        ("site-id = \n", "not a readable TOML file"),
        (f'data-path = "{tmp_path}"\nz-min-examples = "many"\n', "z-min-examples"),
    ]:
        nc.write_text(text)
        code, _, err = _rpe(["data", "check", "--node-config", str(nc)], capsys)
        assert code == 2 and match in err, err


# -- docs/DATA.md: its sample files and commands, read from the guide --------------------------------
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "DATA.md"
#: the guide's placeholder root, rewritten to the test's temporary folder (the only mapping)
SRV = "/srv/rpe"
_FENCE = re.compile(r"^```(\w*)\s*$")
_TARGET = re.compile(r"`(/srv/rpe/[^`]+)`:?\s*$")


def guide_files(path: Path) -> dict[str, str]:
    """``{path: content}`` of every sample file the guide shows right under a line naming its path."""
    lines = path.read_text(encoding="utf-8").splitlines()
    files: dict[str, str] = {}
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence and fence.group(1):
            body, j = [], i + 1
            while not lines[j].startswith("```"):
                body.append(lines[j])
                j += 1
            prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
            named = _TARGET.search(prev)
            if named and fence.group(1) in ("csv", "jsonl", "toml"):
                files[named.group(1)] = "\n".join(body) + "\n"
            i = j
        i += 1
    return files


def _from_guide(tmp_path: Path) -> list[str]:
    from support.doc_commands import section_commands

    for name, text in guide_files(GUIDE).items():
        dest = Path(name.replace(SRV, str(tmp_path)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text.replace(SRV, str(tmp_path)), encoding="utf-8")
    # the volumes the guide's image example names: the shared TotalSegmentator CT and its label map
    vols = tmp_path / "volumes"
    (vols / "images").mkdir(parents=True)
    (vols / "labels").mkdir()
    src = data_root() / "totalsegmentator-test"
    (vols / "images" / "case1.nii.gz").write_bytes((src / "example_ct_sm.nii.gz").read_bytes())
    (vols / "labels" / "case1.nii.gz").write_bytes((src / "example_seg.nii.gz").read_bytes())
    return [c.replace(SRV, str(tmp_path)) for c in section_commands(GUIDE, "Check before you start")]


def test_the_guides_commands_do_what_it_says(tmp_path, capsys):
    files = guide_files(GUIDE)
    assert {"/srv/rpe/data/train.csv", "/srv/rpe/data/eval.jsonl", "/srv/rpe/site/node-config.toml"} <= set(files)
    commands = _from_guide(tmp_path)
    assert len(commands) == 4 and all(c.startswith("rpe data check ") for c in commands)
    outs = []
    for cmd in commands:
        code, out, err = _rpe(shlex.split(cmd)[1:], capsys)
        assert code == 0, f"{cmd}\n{out}{err}"
        outs.append(out)
    text_check, nc_check, json_check, image_check = outs
    for out in (text_check, nc_check):  # what the guide says they print
        assert "would use: 3 train, 1 eval, 0 unlabeled" in out
        assert "prompt='Befund', target='Beurteilung', uid='Accession', group='xray-chest' (report-group)" in out
        warnings = [ln for ln in out.splitlines() if "warning:" in ln]
        assert len(warnings) == 2 and "z-min-examples" in warnings[0] and "metrics-min-reports" in warnings[1]
    assert json.loads(json_check)["checks"][0]["used"] == {"train": 3, "eval": 1, "unlabeled": 0}
    assert "segmentation:" in image_check and "case1.nii.gz" in image_check and "voxel" in image_check
    # "A typo exits 2 naming the key meant; an empty findings cell exits 1 naming the file and its line"
    typo = shlex.split(commands[0].replace("report-columns=", "report-colums="))[1:]
    code, _, err = _rpe(typo, capsys)
    assert code == 2 and "did you mean 'report-columns'" in err
    with open(tmp_path / "data" / "train.csv", "a", encoding="utf-8") as fh:
        fh.write("A1004;;Normal.;Dr C\n")
    code, out, _ = _rpe(shlex.split(commands[1])[1:], capsys)
    assert code == 1 and "train.csv: row at line 5: the findings cell ('Befund') is empty" in out


def test_the_guides_sample_lines_are_read_as_it_says():
    """The schema's sample JSONL line and CSV file (no path above them) read as the guide describes."""
    text = GUIDE.read_text(encoding="utf-8")
    jsonl = re.search(r"A sample line:\n\n```jsonl\n(.*?)\n```", text, re.S)
    csv_sample = re.search(r"second report not written yet:\n\n```csv\n(.*?)\n```", text, re.S)
    assert jsonl and csv_sample
    import tempfile

    from common.families.report.sitedata import read_reports

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "s.jsonl").write_text(jsonl.group(1) + "\n")
        (Path(tmp) / "s.csv").write_text(csv_sample.group(1) + "\n")
        (ex,) = read_reports(Path(tmp) / "s.jsonl")
        assert ex.labeled and ex.group == "xray-chest" and ex.uid == "A1001"
        cols = {"uid": "Accession", "prompt": "Befund", "target": "Beurteilung"}
        a, b = read_reports(Path(tmp) / "s.csv", cols, "xray-chest")
        assert a.labeled and not b.labeled and b.prompt == "Small left pleural effusion; no pneumothorax."
