"""``rpe data check`` for the report family: every row of the site's report files read as the site
would read them, each problem named with its file and row, no model and no torch.

What is a problem (the site could not use the data, or would use something else than meant): a
missing path, a row the reader refuses (bad JSON, an unknown key, an empty findings cell, a row with
the wrong number of cells), a column mapping naming a column the file lacks, two files for one
split, no labeled report and no unlabeled one. What is a warning (usable, but probably not what the
hospital meant): duplicate uids, a target column that is never filled (every report unlabeled),
labeled rows in an ``unlabeled`` file (ignored), no held-out ``eval`` file (the site can enrol, but
reports no scores), a file-wide ``report-group`` overriding a group column.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from common.families.base import DataCheck, FamilyError, SiteInputs
from common.families.report.data import DatasetFormatError, Example, iter_jsonl
from common.families.report.sitedata import (
    COLUMNS_KEY,
    GROUP_KEY,
    is_csv,
    iter_csv,
    parse_columns,
    split_files,
)

#: problems listed per file before "... and N more"
MAX_LISTED = 20


def check_reports(site: SiteInputs) -> DataCheck:
    """The report family's ``check_data``."""
    path = Path(site.data_path).expanduser()
    out = DataCheck("report-text", str(path))
    if not path.exists():
        out.problems.append(
            f"{path}: does not exist; data-path is a report file (.jsonl or .csv) or a folder with "
            "train/eval/unlabeled files"
        )
        return out
    try:
        columns = parse_columns(site.option(COLUMNS_KEY))
    except FamilyError as exc:
        out.problems.append(str(exc))
        return out
    group = site.option(GROUP_KEY) or None
    if path.is_dir():
        try:
            files = split_files(path)
        except FamilyError as exc:
            out.problems.append(str(exc))
            return out
        ignored = sorted(
            p.name for p in path.iterdir() if p.is_file() and p not in files.values() and not p.name.startswith(".")
        )
        if ignored:
            out.warnings.append(f"{path}: not read (not a train/eval/unlabeled file): {', '.join(ignored[:10])}")
    else:
        files = {"file": path}
    used: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    uids: Counter[str] = Counter()
    for split, f in files.items():
        rows = _check_file(out, split, f, columns, group)
        if rows is None:
            continue
        labeled = [e for e in rows if e.labeled]
        unlabeled = [e for e in rows if not e.labeled]
        if split == "unlabeled" and labeled:
            out.warnings.append(
                f"{f}: {len(labeled)} row(s) have a target and are NOT used (the unlabeled file's rows are "
                "read without targets only): move them to train or eval, or empty their target"
            )
        used["eval" if split == "eval" else "train"] += len(labeled) if split != "unlabeled" else 0
        used["unlabeled"] += len(unlabeled)
        groups.update(e.group for e in rows)
        uids.update(e.uid for e in rows)
    out.used = {k: used.get(k, 0) for k in ("train", "eval", "unlabeled")}
    if columns and not any(is_csv(f) for f in files.values()):
        out.warnings.append(f"{COLUMNS_KEY} is set, but no file is CSV: JSONL files are read by their keys")
    if groups:
        out.lines.append("groups: " + ", ".join(f"{g} {n}" for g, n in groups.most_common(10)))
    dup = [u for u, n in uids.items() if n > 1]
    if dup:
        out.warnings.append(f"{len(dup)} uid(s) appear more than once (e.g. {dup[0]!r}); a uid names one report")
    if out.used["train"] + out.used["eval"] + out.used["unlabeled"] == 0 and not out.problems:
        out.problems.append(f"{path}: holds no reports; one per line (JSONL) or per row (CSV) with the findings")
    if "eval" not in files and out.used["train"]:
        where = "no eval file" if path.is_dir() else "one file holds no held-out split"
        out.warnings.append(
            f"{path}: {where}: the site can enrol, but has no held-out reports to score adapters on "
            "(a folder with train and eval files has)"
        )
    return out


def _check_file(
    out: DataCheck, split: str, f: Path, columns: dict[str, str], group: str | None
) -> list[Example] | None:
    """Read one file, adding its layout line, problems and warnings to ``out``; its good rows."""
    try:
        if is_csv(f):
            layout, rows_iter = iter_csv(f, columns, group)
            desc = layout.describe(group)
            if layout.columns.get("group") and group:
                out.warnings.append(
                    f"{f}: has a group column ({layout.columns['group']!r}); {GROUP_KEY} is used only for "
                    "rows whose group cell is empty"
                )
        else:
            rows_iter, desc = iter_jsonl(f, group), "JSONL (keys prompt, target, uid, group)"
        good: list[Example] = []
        bad: list[str] = []
        for _, got in rows_iter:
            if isinstance(got, DatasetFormatError):
                bad.append(str(got))
            else:
                good.append(got)
    except (DatasetFormatError, OSError) as exc:
        out.problems.append(str(exc))
        return None
    labeled = sum(e.labeled for e in good)
    label = "" if split == "file" else f"{split}: "
    out.lines.append(f"{label}{f} ({desc}): {len(good)} report(s), {labeled} with a target")
    out.problems.extend(bad[:MAX_LISTED])
    if len(bad) > MAX_LISTED:
        out.problems.append(f"{f}: ... and {len(bad) - MAX_LISTED} more bad row(s)")
    if good and not labeled and split in ("file", "train", "eval"):
        out.warnings.append(
            f"{f}: no report has a target (impression): every report is unlabeled, used for z only "
            "(the site can be a composition target, but cannot enrol an adapter)"
        )
    return good
