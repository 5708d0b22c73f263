"""Real report data: loaders, grouping rule, deterministic split, site dataset files, task features."""

from __future__ import annotations

import json

import pytest

from common.families.report.data import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    REPO_ROOT,
    DatasetFormatError,
    DatasetMissingError,
    Example,
    data_root,
    dataset_dir,
    load_iu_xray,
    load_medpix,
    read_jsonl,
    report_groups,
    split,
    write_jsonl,
)
from common.families.report.task import IGNORE_INDEX, Task, TextReportTask, group_kind, rouge_l
from common.models import load_tokenizer


@pytest.fixture(scope="module")
def groups() -> dict[str, list[Example]]:
    return report_groups()


def test_iu_xray_counts() -> None:
    examples = load_iu_xray()
    assert len(examples) == 3331
    assert {e.group for e in examples} == {"xray-chest"}
    assert all(e.prompt and e.target for e in examples)
    assert len({e.uid for e in examples}) == len(examples)


def test_medpix_grouping_rule() -> None:
    skip = load_medpix()
    assert {k: len(v) for k, v in skip.items() if len(v) >= 50} == {
        "ct-thorax": 120,
        "ct-abdomen": 117,
        "mr-head": 89,
        "ct-head": 74,
        "mr-spine": 73,
    }
    assert sum(len(v) for v in skip.values()) == 654 - 74  # mixed CT+MR cases are left out
    majority = load_medpix(mixed="majority")
    assert sum(len(v) for v in majority.values()) == 654 - 14  # only CT/MR image-count ties left out
    assert len(majority["mr-head"]) > len(skip["mr-head"])
    with pytest.raises(ValueError, match="mixed"):
        load_medpix(mixed="both")


def test_report_groups_min_size(groups: dict[str, list[Example]]) -> None:
    assert list(groups) == ["xray-chest", "ct-thorax", "ct-abdomen", "mr-head", "ct-head", "mr-spine"]
    for name, examples in groups.items():
        assert all(e.group == name and e.target for e in examples)
    assert set(report_groups(min_size=100)) == {"xray-chest", "ct-thorax", "ct-abdomen"}


def test_data_dir_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RPE_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="RPE_DATA_DIR"):
        load_iu_xray()


def test_data_root_is_the_env_var_else_shared_data_beside_the_checkout(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert (
        REPO_ROOT / "common" / "families" / "report" / "data.py"
    ).is_file() and DEFAULT_DATA_DIR == REPO_ROOT.parent / "shared" / "data"
    assert data_root() == REPO_ROOT.parent / "shared" / "data"
    monkeypatch.chdir(tmp_path)  # the default does not depend on the current directory
    assert data_root() == REPO_ROOT.parent / "shared" / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert data_root() == tmp_path / "elsewhere"


def test_the_tree_holds_no_third_party_data() -> None:
    assert not (REPO_ROOT / "data" / "iu-xray").exists() and not (REPO_ROOT / "data" / "medpix2").exists()


def test_a_missing_set_names_the_folder_the_variable_and_the_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetMissingError) as err:
        load_medpix()
    msg = str(err.value)
    assert str(tmp_path / "medpix2") in msg and DATA_DIR_ENV in msg and "CHILab1/MedPix-2.0" in msg
    assert err.value.expected == tmp_path / "medpix2" and isinstance(err.value, FileNotFoundError)
    (tmp_path / "iu-xray").mkdir()  # the folder is there but its file is not
    with pytest.raises(DatasetMissingError, match="indiana_reports.csv") as err:
        load_iu_xray()
    assert "Open-i" in str(err.value)
    (tmp_path / "prostate-multisite").mkdir()
    assert dataset_dir("prostate-multisite") == tmp_path / "prostate-multisite"
    with pytest.raises(DatasetMissingError, match="SOURCE.md"):  # an unknown set still says where to look
        dataset_dir("no-such-set")


def test_split_deterministic_and_disjoint(groups: dict[str, list[Example]]) -> None:
    examples = groups["ct-head"]
    train, held = split(examples, 20, seed=3)
    assert len(held) == 20 and len(train) == len(examples) - 20
    assert not {e.uid for e in train} & {e.uid for e in held}
    again_train, again_held = split(list(reversed(examples)), 20, seed=3)  # order does not matter
    assert [e.uid for e in again_held] == [e.uid for e in held]
    assert [e.uid for e in again_train] == [e.uid for e in train]
    assert [e.uid for e in split(examples, 20, seed=4)[1]] != [e.uid for e in held]
    with pytest.raises(ValueError):
        split(examples, len(examples) + 1, seed=0)


def test_jsonl_round_trip(tmp_path) -> None:
    examples = [
        Example(prompt="Lungs clear.", target="Normal chest.", group="xray-chest", uid="a"),
        Example(prompt="Ring-enhancing lesion.", target=None, group="mr-head", uid="b"),
    ]
    path = write_jsonl(tmp_path / "site" / "data.jsonl", examples)
    assert read_jsonl(path) == examples
    assert "target" not in json.loads(path.read_text().splitlines()[1])  # unlabeled: no target key


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: expected one JSON object per line"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"prompt": "x", "group": "g", "targt": "y"}', "line 2: unknown keys \\['targt'\\]"),
        ('{"group": "g"}', "line 2: expected 'prompt'"),
        ('{"prompt": "x", "group": "g", "target": 3}', "line 2: expected 'target'"),
        ('{"prompt": "x"}', "line 2: expected 'group'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text('{"prompt": "ok", "group": "g"}\n' + line + "\n")
    with pytest.raises(DatasetFormatError, match=message) as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def test_jsonl_defaults(tmp_path) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text('{"prompt": "x"}\n\n{"prompt": "y", "target": null}\n')
    rows = read_jsonl(path, default_group="ct-head")
    expected = [("site-1", "ct-head", None), ("site-3", "ct-head", None)]
    assert [(r.uid, r.group, r.target) for r in rows] == expected
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


# -- the task ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_prompt_uses_chat_template_and_group_kind(tok) -> None:
    task = TextReportTask()
    assert isinstance(task, Task)
    xray = Example(prompt="Heart normal.", target="Normal.", group="xray-chest", uid="1")
    ct = Example(prompt="Hyperdense MCA.", target="Stroke", group="ct-head", uid="2")
    p1, p2 = task.build_prompt(xray, tok), task.build_prompt(ct, tok)
    assert "You are a radiologist." in p1 and "Findings: Heart normal.\nWrite the impression." in p1
    assert "Findings: Hyperdense MCA.\nGive the diagnosis." in p2
    assert p1.endswith("<|im_start|>assistant\n")
    assert group_kind("xray-chest") == "impression" and group_kind("mr-spine") == "diagnosis"


def test_training_features_mask_prompt_tokens(tok) -> None:
    task = TextReportTask()
    ex = Example(prompt="Large left pleural effusion.", target="Pleural effusion", group="ct-thorax", uid="1")
    (feat,) = task.training_features(tok, [ex], max_length=192)
    prompt_ids = tok(task.build_prompt(ex, tok), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert feat["input_ids"][:n] == prompt_ids
    assert feat["labels"][:n] == [IGNORE_INDEX] * n
    target = [t for t in feat["labels"] if t != IGNORE_INDEX]
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]) == "Pleural effusion"
    assert feat["input_ids"][n:] == target


def test_training_features_truncate_findings_not_template(tok) -> None:
    task = TextReportTask()
    long = Example(prompt="nodule " * 400, target="Metastases", group="ct-thorax", uid="1")
    (feat,) = task.training_features(tok, [long], max_length=64)
    assert len(feat["input_ids"]) <= 64
    text = tok.decode(feat["input_ids"])
    assert text.endswith("Give the diagnosis.<|im_end|>\n<|im_start|>assistant\nMetastases<|im_end|>")
    with pytest.raises(ValueError, match="no target"):
        task.training_features(tok, [Example("x", None, "ct-head", "u")], 64)


def test_embedding_texts_and_score() -> None:
    task = TextReportTask()
    exs = [Example("a b", "c", "ct-head", "1"), Example("d", None, "ct-head", "2")]
    assert task.embedding_texts(exs) == ["a b", "d"]
    scores = task.score(["acute infarcts", ""], ["acute infarct", "normal"])
    assert scores["n"] == 2 and scores["rouge_l"] == pytest.approx(0.5)  # stemming: infarcts == infarct
    assert rouge_l(["normal chest"], ["Normal chest."]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        rouge_l(["a"], [])
