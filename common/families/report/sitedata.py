"""A report site's own files: JSONL as the project writes it, or a CSV export with a column mapping.

A hospital's report export is usually a spreadsheet, not JSONL. A CSV (or TSV / semicolon) file is
read with its header row, a **column mapping** saying which column is which field:

* ``prompt`` (the findings, required), ``target`` (the impression; an empty cell is an unlabeled
  report), ``uid`` (else ``<file stem>-<row>``), ``group`` (e.g. ``ct-head``; else the site's
  ``report-group``, one group for the whole file).
* The mapping is the node-config key ``report-columns``, ``FIELD=COLUMN`` pairs separated by commas
  (``prompt=Befund,target=Beurteilung,uid=Accession``); a field left out is found by its common
  names (``CSV_DEFAULTS``, case-insensitive: ``findings`` for prompt, ``impression`` for target...).
* The delimiter (comma, semicolon, tab) is read from the header line; a UTF-8 byte-order mark (an
  Excel export) is skipped. Errors name the file, the row (the file's line number) and what to do.

A site's ``data-path`` is one file (labeled rows train, unlabeled rows are unlabeled) or a folder
holding ``train``, ``eval`` and/or ``unlabeled`` as ``.jsonl`` or ``.csv`` (one of each split).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.families.base import FamilyError, SiteDataset
from common.families.report.data import DatasetFormatError, Example, iter_jsonl

FIELDS = ("prompt", "target", "uid", "group")
#: column names found without a mapping (compared case-insensitively, spaces as underscores)
CSV_DEFAULTS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "findings", "finding", "report_findings"),
    "target": ("target", "impression", "impressions", "conclusion", "diagnosis"),
    "uid": ("uid", "id", "report_id", "accession", "accession_number", "study_id"),
    "group": ("group", "report_group", "exam_group"),
}
CSV_SUFFIXES = (".csv", ".tsv")
SPLITS = ("train", "eval", "unlabeled")
#: node-config keys of the report family (``ReportFamily.node_config_keys``)
COLUMNS_KEY, GROUP_KEY = "report-columns", "report-group"
_MAX_FIELD = 1 << 20  # one cell above 1 MiB is not a report
UTF8_HINT = 'save the file as UTF-8 (in a spreadsheet: "CSV UTF-8"), or convert it with iconv -t UTF-8'


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``{"prompt": "Befund", ...}`` from ``"prompt=Befund,target=Beurteilung"`` (``report-columns``)."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        pairs = []
        for item in filter(None, (p.strip() for p in str(spec).split(","))):
            key, sep, col = item.partition("=")
            if not sep or not col.strip():
                raise FamilyError(
                    f"{COLUMNS_KEY}: {item!r} is not FIELD=COLUMN; e.g. prompt=Findings,target=Impression "
                    f"(fields: {', '.join(FIELDS)})"
                )
            pairs.append((key.strip(), col.strip()))
    out: dict[str, str] = {}
    for key, col in pairs:
        if key not in FIELDS:
            raise FamilyError(f"{COLUMNS_KEY}: unknown field {key!r}; the fields are {', '.join(FIELDS)}")
        out[key] = col
    return out


def _norm(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


@dataclass
class CsvLayout:
    """Which column of a CSV file each field comes from (None: not in the file)."""

    path: Path
    delimiter: str
    header: list[str]
    columns: dict[str, str | None] = field(default_factory=dict)

    def describe(self, default_group: str | None) -> str:
        parts = []
        for f in FIELDS:
            col = self.columns.get(f)
            if col is not None:
                parts.append(f"{f}={col!r}")
            elif f == "group" and default_group:
                parts.append(f"group={default_group!r} ({GROUP_KEY})")
            elif f == "uid":
                parts.append(f"uid=<{self.path.stem}-ROW>")
            else:
                parts.append(f"{f}=none")
        sep = {",": "comma", ";": "semicolon", "\t": "tab"}.get(self.delimiter, repr(self.delimiter))
        return f"CSV ({sep}-separated), {', '.join(parts)}"


def csv_layout(path: Path, columns: Mapping[str, str] | None, default_group: str | None) -> CsvLayout:
    """The header of ``path`` and each field's column: the mapping first, then ``CSV_DEFAULTS``."""
    csv.field_size_limit(_MAX_FIELD)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({exc.reason}); {UTF8_HINT}") from None
    if not first.strip():
        raise DatasetFormatError(f"{path}: line 1: expected a header row naming the columns (e.g. findings,impression)")
    delimiter = max((",", ";", "\t"), key=first.count) if any(d in first for d in ",;\t") else ","
    header = next(csv.reader([first], delimiter=delimiter))
    by_norm = {_norm(h): h for h in header}
    mapping = dict(columns or {})
    layout = CsvLayout(path, delimiter, header)
    for f in FIELDS:
        if f in mapping:
            if mapping[f] not in header:
                near = by_norm.get(_norm(mapping[f]))
                hint = f" (did you mean {near!r}?)" if near else ""
                raise DatasetFormatError(
                    f"{path}: {COLUMNS_KEY} maps {f} to column {mapping[f]!r}, which the header does not have"
                    f"{hint}; the columns are: {', '.join(header)}"
                )
            layout.columns[f] = mapping[f]
        else:
            layout.columns[f] = next((by_norm[n] for n in CSV_DEFAULTS[f] if n in by_norm), None)
    if layout.columns["prompt"] is None:
        raise DatasetFormatError(
            f"{path}: no findings column: none of {', '.join(CSV_DEFAULTS['prompt'])} in the header "
            f"({', '.join(header)}); name the columns with the node-config key {COLUMNS_KEY}, e.g. "
            f'{COLUMNS_KEY} = "prompt=<findings column>,target=<impression column>"'
        )
    if layout.columns["group"] is None and not default_group:
        raise DatasetFormatError(
            f"{path}: no group column (none of {', '.join(CSV_DEFAULTS['group'])}); map one with "
            f"{COLUMNS_KEY} (group=COLUMN) or give the whole file one group with the node-config key "
            f"{GROUP_KEY} (e.g. ct-head)"
        )
    return layout


def iter_csv(
    path: str | os.PathLike[str], columns: Mapping[str, str] | None = None, default_group: str | None = None
) -> tuple[CsvLayout, Iterator[tuple[int, Example | DatasetFormatError]]]:
    """The file's layout, and ``(line number, Example or that row's error)`` for every data row."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"{src}: dataset file not found")
    layout = csv_layout(src, columns, default_group)
    return layout, _csv_rows(src, layout, default_group)


def _csv_rows(
    src: Path, layout: CsvLayout, default_group: str | None
) -> Iterator[tuple[int, Example | DatasetFormatError]]:
    cols = layout.columns
    with open(src, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=layout.delimiter)
        index = {f: layout.header.index(c) for f, c in cols.items() if c is not None}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise DatasetFormatError(f"{src}: not UTF-8 text ({exc.reason}); {UTF8_HINT}") from None
            except csv.Error as exc:
                raise DatasetFormatError(f"{src}: line {reader.line_num}: not readable as CSV ({exc})") from None
            lineno = reader.line_num
            if lineno == 1:
                continue  # the header
            if not any(cell.strip() for cell in row):
                continue
            where = f"{src}: row at line {lineno}"
            if len(row) != len(layout.header):
                yield (
                    lineno,
                    DatasetFormatError(
                        f"{where}: {len(row)} cells, the header has {len(layout.header)}; a cell with the "
                        f"delimiter {layout.delimiter!r} or a line break must be in double quotes"
                    ),
                )
                continue
            cell = {f: " ".join(row[i].split()) for f, i in index.items()}
            if not cell.get("prompt"):
                yield (
                    lineno,
                    DatasetFormatError(
                        f"{where}: the findings cell ({cols['prompt']!r}) is empty; fill it or remove the row"
                    ),
                )
                continue
            group = cell.get("group") or default_group
            if not group:
                yield (
                    lineno,
                    DatasetFormatError(
                        f"{where}: the group cell ({cols['group']!r}) is empty; fill it, or set {GROUP_KEY}"
                    ),
                )
                continue
            uid = cell.get("uid") or f"{src.stem}-{lineno}"
            yield lineno, Example(prompt=cell["prompt"], target=cell.get("target") or None, group=group, uid=uid)


def is_csv(path: Path) -> bool:
    return path.suffix.lower() in CSV_SUFFIXES


def read_reports(
    path: str | os.PathLike[str], columns: Mapping[str, str] | None = None, default_group: str | None = None
) -> list[Example]:
    """Every report of a JSONL or CSV file (by its suffix); the first bad row is the error."""
    src = Path(path)
    rows = iter_csv(src, columns, default_group)[1] if is_csv(src) else iter_jsonl(src, default_group)
    out: list[Example] = []
    for _, got in rows:
        if isinstance(got, DatasetFormatError):
            raise got
        out.append(got)
    return out


def split_files(folder: Path) -> dict[str, Path]:
    """``{split: file}`` of a site folder (``train``/``eval``/``unlabeled`` as .jsonl or .csv)."""
    found: dict[str, Path] = {}
    for split in SPLITS:
        files = [folder / f"{split}{ext}" for ext in (".jsonl", *CSV_SUFFIXES) if (folder / f"{split}{ext}").is_file()]
        if len(files) > 1:
            raise FamilyError(
                f"{folder}: both {' and '.join(f.name for f in files)}; keep one file per split (which would be used?)"
            )
        if files:
            found[split] = files[0]
    if not found:
        raise FamilyError(
            f"{folder}: expected train, eval and/or unlabeled files (.jsonl or .csv), e.g. train.jsonl; "
            f"found {', '.join(sorted(p.name for p in folder.iterdir())[:10]) or 'nothing'}"
        )
    return found


def load_site_examples(
    path: Path, columns: str | Mapping[str, str] | None = None, default_group: str | None = None
) -> SiteDataset:
    """A report file (labeled rows train, unlabeled rows are unlabeled) or a folder of split files
    (labeled rows of ``eval`` are held out; every unlabeled row is unlabeled)."""
    mapping = parse_columns(columns)
    group = default_group or None
    if path.is_dir():
        rows = {split: read_reports(f, mapping, group) for split, f in split_files(path).items()}
        train = [e for e in rows.get("train", []) if e.labeled]
        held = [e for e in rows.get("eval", []) if e.labeled]
        unlabeled = [e for rs in rows.values() for e in rs if not e.labeled]
        data = SiteDataset(train, held, unlabeled)
    else:
        every = read_reports(path, mapping, group)
        data = SiteDataset([e for e in every if e.labeled], [], [e for e in every if not e.labeled])
    data.groups = [g for g, _ in Counter(e.group for e in data.all).most_common()]
    return data
