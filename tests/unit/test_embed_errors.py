"""``rpe embed`` on input it cannot read: one ``rpe: error:`` line that names the input once.

It said ``rpe: error: far/texts.jsonl: far/texts.jsonl: line 1: expected 'group' ...`` (the reader's
message already starts with the file) and ``rpe: error: fundus: no images (...) in fundus``. Both
families; exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
from support.cli import rpe_run


@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_an_unreadable_input_is_named_once(capsys, tmp_path, family):
    if family == "report-text":
        bad = tmp_path / "texts.jsonl"
        bad.write_text(json.dumps({"prompt": "no group here", "uid": "1"}) + "\n")
        argv = ["--data", str(bad)]
    else:
        bad = tmp_path / "no-images"
        bad.mkdir()
        (bad / "notes.txt").write_text("not an image")
        argv = ["--family", family, "--images", str(bad)]
    code, out, err = rpe_run(capsys, "embed", *argv, "--out", str(tmp_path / "z.npy"))
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("rpe: error: "), err
    assert lines[0].count(str(bad)) == 1, lines[0]
    assert not (tmp_path / "z.npy").exists()
