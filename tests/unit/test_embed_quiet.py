"""``rpe embed --quiet`` draws no progress bar, on both families.

Its ``--help`` says "no progress bar", but a report z still drew two (transformers' "Loading
weights" and the embedding's own), because the family's ``embed`` takes no progress argument and
``common.embedding.mean_embedding`` defaults to a bar. ``common.embedding.quiet()`` turns both off
for the command and restores them after (a later command in the same process still gets its bars).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import make_tiny_sam
from support.cli import rpe_run

BAR = ("it/s]", "tok/s]", "%|")


def report_data(tmp_path: Path) -> Path:
    d = tmp_path / "reports.jsonl"
    rows = [{"group": "ct-head", "prompt": f"finding number {i} of the head", "uid": str(i)} for i in range(12)]
    d.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.mark.parametrize("family", ["report-text", "segmentation"])
def test_quiet_draws_no_bar_and_leaves_the_bars_on_after(capsys, tmp_path, tiny_model_dir, family):
    from transformers.utils import logging as hf_logging

    import common.embedding as emb
    from common.dataroot import data_root

    if family == "report-text":
        argv = ["--data", str(report_data(tmp_path)), "--model", str(tiny_model_dir)]
    else:
        images = data_root() / "prostate-multisite" / "RUNMC" / "train" / "image"
        argv = ["--family", family, "--images", str(images), "--model", str(make_tiny_sam(tmp_path / "sam", seed=0))]
    code, out, err = rpe_run(capsys, "embed", *argv, "--out", str(tmp_path / "z.npy"), "--quiet")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'z.npy'}: z of dim ")
    assert not any(b in err for b in BAR), err
    assert emb.PROGRESS is True and hf_logging.is_progress_bar_enabled()  # restored

    if family == "report-text":  # without --quiet the bar is there: the check above means something
        code, _, err = rpe_run(capsys, "embed", *argv, "--out", str(tmp_path / "z2.npy"))
        assert code == 0 and "embedding:" in err and any(b in err for b in BAR), err


def test_quiet_restores_the_bars_when_the_command_fails(capsys, tmp_path, tiny_model_dir):
    from transformers.utils import logging as hf_logging

    import common.embedding as emb

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = rpe_run(
        capsys,
        "embed",
        "--data",
        str(empty),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "z.npy"),
        "--quiet",
    )
    assert code != 0 and "rpe: error" in err
    assert emb.PROGRESS is True and hf_logging.is_progress_bar_enabled()
