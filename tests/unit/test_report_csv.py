"""A hospital's report export as CSV (issue 27, item 5): read with a column mapping (node-config
``report-columns``), the same examples as the JSONL form, as a single file or split files of a
folder, and every way a real export goes wrong named with its file, row and what to do."""

from __future__ import annotations

import pytest

from common.families import get_family
from common.families.base import FamilyError, SiteInputs
from common.families.report.data import DatasetFormatError, Example, read_jsonl, write_jsonl
from common.families.report.sitedata import load_site_examples, parse_columns, read_reports

EXAMPLES = [
    Example("Heart size normal. Lungs clear.", "No acute disease.", "xray-chest", "A1"),
    Example('Small left effusion, with "quotes"; and a semicolon.', None, "xray-chest", "A2"),
    Example("Hypodense lesion in segment 7.", "Likely cyst.", "ct-abdomen", "A3"),
]


def _site(path, **options) -> SiteInputs:
    return SiteInputs("a", path, "smollm2-135m-instruct", path.parent, options)


def test_a_csv_with_common_column_names_reads_like_its_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "reports.jsonl", EXAMPLES)
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text(
        "uid,group,findings,impression\n"
        "A1,xray-chest,Heart size normal.   Lungs clear.,No acute disease.\n"
        'A2,xray-chest,"Small left effusion, with ""quotes""; and a semicolon.",\n'
        "A3,ct-abdomen,Hypodense lesion in segment 7.,Likely cyst.\n",
        encoding="utf-8",
    )
    assert read_reports(csv_path) == read_jsonl(jsonl) == EXAMPLES
    family = get_family("report-text")
    data = family.load_data(_site(csv_path))
    assert [e.uid for e in data.train] == ["A1", "A3"] and [e.uid for e in data.unlabeled] == ["A2"]
    counts = family.counts(_site(csv_path))  # whoami sees the CSV too
    assert counts.ok and counts.n_labeled == 2 and counts.n_unlabeled == 1


def test_a_mapped_semicolon_export_with_a_bom_and_one_group(tmp_path):
    """What a German spreadsheet export looks like: BOM, semicolons, own column names, no group column."""
    path = tmp_path / "export.csv"
    text = 'Accession;Befund;Beurteilung;Arzt\nX1;Herz normal.;Kein Befund.;Dr A\nX2;"Erguss\nlinks";;Dr B\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    site = _site(
        path, **{"report-columns": "uid=Accession,prompt=Befund,target=Beurteilung", "report-group": "ct-thorax"}
    )
    data = get_family("report-text").load_data(site)
    assert [(e.uid, e.prompt, e.target, e.group) for e in data.all] == [
        ("X1", "Herz normal.", "Kein Befund.", "ct-thorax"),
        ("X2", "Erguss links", None, "ct-thorax"),
    ]


def test_a_folder_of_split_files_mixes_csv_and_jsonl(tmp_path):
    (tmp_path / "site").mkdir()
    write_jsonl(tmp_path / "site" / "eval.jsonl", EXAMPLES[2:])
    (tmp_path / "site" / "train.csv").write_text("findings,impression,group\nLungs clear.,Normal.,xray-chest\n")
    (tmp_path / "site" / "unlabeled.csv").write_text("findings;group\nNodule.;xray-chest\n")
    data = load_site_examples(tmp_path / "site")
    assert [e.prompt for e in data.train] == ["Lungs clear."] and [e.uid for e in data.eval] == ["A3"]
    assert [e.prompt for e in data.unlabeled] == ["Nodule."] and data.groups[0] == "xray-chest"
    write_jsonl(tmp_path / "site" / "train.jsonl", EXAMPLES[:1])
    with pytest.raises(FamilyError, match="both train.jsonl and train.csv"):
        load_site_examples(tmp_path / "site")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "reports.txt").write_text("x")
    with pytest.raises(FamilyError, match=r"expected train, eval and/or unlabeled files.*reports.txt"):
        load_site_examples(tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        ("Befund,Beurteilung,group\nx,y,g\n", {}, r"no findings column.*Befund, Beurteilung.*report-columns"),
        ("findings,impression\nx,y\n", {}, r"no group column.*report-group"),
        (
            "findings,impression,group\nx,y,g\n",
            {"report-columns": "target=Impresion"},
            r"maps target to column 'Impresion', which the header does not have.*findings, impression, group",
        ),
        ("findings,impression,group\nx,y,g\n", {"report-columns": "findings=x"}, r"unknown field 'findings'"),
        ("findings,impression,group\nx,y,g\n", {"report-columns": "prompt"}, r"'prompt' is not FIELD=COLUMN"),
        ("findings,impression,group\nok,y,g\n ,y,g\n", {}, r"row at line 3: the findings cell \('findings'\) is empty"),
        ("findings,impression,group\nok,y,g\nok,y\n", {}, r"row at line 3: 2 cells, the header has 3.*double quotes"),
        ('findings,impression,group\n"a\nb",y,g\nok,y\n', {}, r"row at line 4: 2 cells"),  # file lines, not records
        ("", {}, r"line 1: expected a header row"),
    ],
    ids=[
        "no-findings",
        "no-group",
        "mapped-missing",
        "bad-field",
        "not-pairs",
        "empty-cell",
        "cells",
        "lines",
        "empty",
    ],
)
def test_each_kind_of_damage_is_named(tmp_path, text, options, match):
    path = tmp_path / "r.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises((DatasetFormatError, FamilyError), match=match):
        load_site_examples(path, options.get("report-columns"), options.get("report-group"))
    assert not get_family("report-text").counts(_site(path, **options)).ok  # whoami says "not ok", no traceback


def test_a_file_that_is_not_utf8_says_how_to_convert_it(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes("findings,impression,group\nHerzgröße normal,ok,g\n".encode("cp1252"))
    with pytest.raises(DatasetFormatError, match=r"not UTF-8.*CSV UTF-8.*iconv"):
        read_reports(path)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_bytes('{"prompt": "Herzgröße", "group": "g"}\n'.encode("cp1252"))
    with pytest.raises(DatasetFormatError, match=r"line 1: not UTF-8"):
        read_jsonl(jsonl)


def test_parse_columns():
    assert parse_columns(" prompt = Befund , target=Beurteilung ") == {"prompt": "Befund", "target": "Beurteilung"}
    assert parse_columns("") == {} and parse_columns(None) == {}
