"""Real radiology report data, parsed at run time from the unmodified source files in the data root.

The data sets are third-party and may not be committed to this repository, so they are read from a
*data root* outside the checkout: ``$RPE_DATA_DIR``, else ``../shared/data`` beside the checkout
(``data_root``). Each set is a folder there (``dataset_dir("iu-xray")``) with a SOURCE.md giving its
origin and licence; a missing set fails at once with :class:`DatasetMissingError`, naming the folder
expected, the environment variable and where the data comes from.

Two public collections feed the experiments:

* **IU X-ray** (``<data root>/iu-xray/indiana_reports.csv``): chest radiograph reports. One group,
  ``xray-chest``; prompt = *findings*, target = *impression*. "XXXX" de-identification
  placeholders are kept as they are (they are part of the real distribution a site would see).
* **MedPix 2.0** (``<data root>/medpix2/Case_topic.json`` + ``Descriptions.json``): teaching cases; prompt
  = case *Findings*, target = *Case Diagnosis* (a short diagnosis, not an impression paragraph).

MedPix grouping rule (documented here because every experiment depends on it):

* modality: a case lists its CT images under ``TAC`` and its MR images under ``MRI`` (this agrees
  with ``Descriptions.json`` ``Type`` for every image). With ``mixed="skip"`` (the default) a
  case with both CT and MR images (74 cases) is left out, so each group holds single-modality
  reports and its findings text speaks about one modality only; with ``mixed="majority"`` such a
  case goes to the modality with more images and ties are left out.
* body region: the ``Location Category`` of the case's images in ``Descriptions.json`` (it is the
  same for every image of a case), mapped to a short slug: Head -> ``head``, Spine and Muscles ->
  ``spine``, Thorax -> ``thorax``, Abdomen -> ``abdomen``, Reproductive and Urinary System ->
  ``gu``.
* group = ``"{ct|mr}-{region}"``, e.g. ``ct-thorax``. Sizes with ``mixed="skip"``: ct-thorax 120,
  ct-abdomen 117, mr-head 89, ct-head 74, mr-spine 73, ct-gu 49, ct-spine 36, and three MR groups
  under 10; with ``mixed="majority"``: mr-head 127, ct-thorax 120, ct-abdomen 117, mr-spine 83,
  ct-head 79, ct-gu 49, ct-spine 38.

A site's dataset is a JSONL file, one example per line (``write_jsonl`` / ``read_jsonl``), or a CSV
export with a column mapping (``common.families.report.csvdata``). A line without ``target`` is an
*unlabeled* example: a new site that only has findings can still compute its embedding z, which is
all zero-shot composition needs. The schema for a person is ``docs/DATA.md``.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# the data root is shared by every family (``common/dataroot.py``); re-exported for existing callers
from common.dataroot import DATA_DIR_ENV as DATA_DIR_ENV
from common.dataroot import DATASET_ORIGINS as DATASET_ORIGINS
from common.dataroot import DEFAULT_DATA_DIR as DEFAULT_DATA_DIR
from common.dataroot import REPO_ROOT as REPO_ROOT
from common.dataroot import DatasetMissingError as DatasetMissingError
from common.dataroot import data_root as data_root
from common.dataroot import dataset_dir
from common.dataroot import resolve_data_dir as resolve_data_dir

#: the sets the report experiments and the demo read
REPORT_DATASETS = ("iu-xray", "medpix2")

IU_XRAY_GROUP = "xray-chest"
MEDPIX_REGIONS: dict[str, str] = {
    "Head": "head",
    "Spine and Muscles": "spine",
    "Thorax": "thorax",
    "Abdomen": "abdomen",
    "Reproductive and Urinary System": "gu",
}
MIXED_RULES = ("skip", "majority")
_JSONL_KEYS = ("uid", "group", "prompt", "target")


class DatasetFormatError(ValueError):
    """A dataset file (or a source data file) does not have the structure we expect."""


@dataclass(frozen=True)
class Example:
    """One report: ``prompt`` is the findings text, ``target`` the impression/diagnosis.

    ``target`` is ``None`` for an unlabeled example (a site that has findings but no reports
    written yet can still contribute an embedding, but cannot train).
    """

    prompt: str
    target: str | None
    group: str
    uid: str

    @property
    def labeled(self) -> bool:
        return self.target is not None


def _clean(text: str | None) -> str:
    """Collapse whitespace (MedPix uses blank lines and bullet indentation) so prompts stay short."""
    return " ".join((text or "").split())


def load_iu_xray(data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """Every IU X-ray report with both findings and impression (3,331), group ``xray-chest``."""
    path = dataset_dir("iu-xray", ["indiana_reports.csv"], data_dir) / "indiana_reports.csv"
    out: list[Example] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"uid", "findings", "impression"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetFormatError(f"{path}: expected columns uid, findings, impression; missing {sorted(missing)}")
        for row in reader:
            findings, impression = _clean(row["findings"]), _clean(row["impression"])
            if findings and impression:
                uid = f"iu-{row['uid']}"
                out.append(Example(prompt=findings, target=impression, group=IU_XRAY_GROUP, uid=uid))
    return out


def _medpix_modality(n_ct: int, n_mr: int, mixed: str) -> str | None:
    if n_ct and not n_mr:
        return "ct"
    if n_mr and not n_ct:
        return "mr"
    if not n_ct and not n_mr or mixed == "skip" or n_ct == n_mr:
        return None
    return "ct" if n_ct > n_mr else "mr"


def load_medpix(data_dir: str | os.PathLike[str] | None = None, mixed: str = "skip") -> dict[str, list[Example]]:
    """MedPix cases with Findings and Case Diagnosis, grouped by ``{modality}-{region}``.

    See the module docstring for the grouping rule; ``mixed`` decides what happens to a case with
    both CT and MR images ("skip" or "majority"). Groups are returned largest first, examples in
    file order.
    """
    if mixed not in MIXED_RULES:
        raise ValueError(f"mixed must be one of {MIXED_RULES}, not {mixed!r}")
    root = dataset_dir("medpix2", ["Case_topic.json", "Descriptions.json"], data_dir)
    cases_path, desc_path = root / "Case_topic.json", root / "Descriptions.json"
    cases = json.loads(cases_path.read_text(encoding="utf-8"))
    descriptions = json.loads(desc_path.read_text(encoding="utf-8"))
    if not isinstance(cases, list) or not isinstance(descriptions, list):
        raise DatasetFormatError(f"{cases_path} and {desc_path} must each hold a JSON list")
    regions: dict[str, Counter[str]] = defaultdict(Counter)
    for row in descriptions:
        regions[str(row.get("U_id"))][str(row.get("Location Category"))] += 1
    groups: dict[str, list[Example]] = defaultdict(list)
    for case in cases:
        uid = str(case.get("U_id"))
        body = case.get("Case") or {}
        findings, diagnosis = _clean(body.get("Findings")), _clean(body.get("Case Diagnosis"))
        if not findings or not diagnosis:
            continue
        modality = _medpix_modality(len(case.get("TAC") or []), len(case.get("MRI") or []), mixed)
        if modality is None or not regions[uid]:
            continue
        category = regions[uid].most_common(1)[0][0]  # one category per case in this release
        region = MEDPIX_REGIONS.get(category, _clean(category).lower().replace(" ", "_") or "unknown")
        group = f"{modality}-{region}"
        groups[group].append(Example(prompt=findings, target=diagnosis, group=group, uid=uid))
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def report_groups(
    min_size: int = 50, data_dir: str | os.PathLike[str] | None = None, mixed: str = "skip"
) -> dict[str, list[Example]]:
    """All report groups (IU X-ray + MedPix) with at least ``min_size`` examples, largest first.

    With the defaults: xray-chest 3331, ct-thorax 120, ct-abdomen 117, mr-head 89, ct-head 74,
    mr-spine 73. Small groups are dropped because a site needs enough reports for both a training
    set and a held-out evaluation set.
    """
    groups = {IU_XRAY_GROUP: load_iu_xray(data_dir), **load_medpix(data_dir, mixed=mixed)}
    kept = {name: exs for name, exs in groups.items() if len(exs) >= min_size}
    return dict(sorted(kept.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def split(examples: Sequence[Example], n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, eval) split: ``n_eval`` held-out examples chosen by ``seed``.

    Examples are first ordered by uid so the split depends only on the set of examples and the
    seed, not on the order a loader returned them in.
    """
    if n_eval < 0 or n_eval > len(examples):
        raise ValueError(f"n_eval={n_eval} must be between 0 and the number of examples ({len(examples)})")
    ordered = sorted(examples, key=lambda e: (e.uid, e.group))
    random.Random(seed).shuffle(ordered)
    return ordered[n_eval:], ordered[:n_eval]


def write_jsonl(path: str | os.PathLike[str], examples: Iterable[Example]) -> Path:
    """Write a site's dataset file: one JSON object per line; unlabeled examples omit ``target``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex in examples:
            row = {k: v for k, v in asdict(ex).items() if v is not None}
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, out)  # a reader never sees a half-written dataset
    return out


def read_jsonl(path: str | os.PathLike[str], default_group: str | None = None) -> list[Example]:
    """Read a site's dataset file written by ``write_jsonl`` (or by hand).

    Each non-blank line must be a JSON object with a non-empty string ``prompt`` (the findings);
    ``target`` (optional: absent or null means unlabeled), ``group`` (required unless
    ``default_group`` is given) and ``uid`` (defaults to ``<file stem>-<line>``) are strings. Unknown
    keys are rejected so that a misspelt ``target`` does not silently turn data into unlabeled data.
    Errors name the file, the line and what was expected (the first one is raised; ``iter_jsonl``
    gives every line's outcome, for ``rpe data check``).
    """
    out: list[Example] = []
    for _, got in iter_jsonl(path, default_group):
        if isinstance(got, DatasetFormatError):
            raise got
        out.append(got)
    return out


def iter_jsonl(
    path: str | os.PathLike[str], default_group: str | None = None
) -> Iterator[tuple[int, Example | DatasetFormatError]]:
    """``(line number, Example or the error of that line)`` for every non-blank line of ``path``."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"{src}: dataset file not found")
    with open(src, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # an editor's BOM
            except UnicodeDecodeError as exc:
                yield lineno, DatasetFormatError(f"{src}: line {lineno}: not UTF-8 text ({exc.reason}); save as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, _jsonl_example(line, f"{src}: line {lineno}", default_group, f"{src.stem}-{lineno}")
            except DatasetFormatError as exc:
                yield lineno, exc


def _jsonl_example(line: str, where: str, default_group: str | None, default_uid: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{where}: expected one JSON object per line ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(_JSONL_KEYS))
    if unknown:
        raise DatasetFormatError(f"{where}: unknown keys {unknown}; allowed: {list(_JSONL_KEYS)}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetFormatError(f"{where}: expected 'prompt', a non-empty string (the findings)")
    target = row.get("target")
    if target is not None and not isinstance(target, str):
        raise DatasetFormatError(f"{where}: expected 'target', a string or absent; got {target!r}")
    group = row.get("group", default_group)
    if not isinstance(group, str) or not group:
        raise DatasetFormatError(f"{where}: expected 'group', a non-empty string (e.g. 'ct-head')")
    uid = row.get("uid", default_uid)
    if not isinstance(uid, str) or not uid:
        raise DatasetFormatError(f"{where}: expected 'uid' to be a non-empty string")
    return Example(prompt=prompt, target=target, group=group, uid=uid)
