"""Every run-config key has a row in deploy/README.md's "Run config" table, and every key a row names
exists.

The table is where a coordinator operator looks up what ``rpe fed run MODE KEY=VALUE`` takes; the
keys themselves are ``[tool.flwr.app.config]`` in pyproject.toml (what ``rpe fed run`` checks a key
against). Eight keys had no row, among them issue 28's ``far-ratio`` (the "nothing close enough"
threshold), so the operator could only find it by reading pyproject.toml.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Run config"


def run_config_keys() -> set[str]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(table["tool"]["flwr"]["app"]["config"])


def documented_keys() -> set[str]:
    """The backquoted names in the first cell of each row of the table under HEADING."""
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    start = text.index("\n" + HEADING) + 1
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    rows = [ln for ln in section.splitlines() if ln.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", ln)]
    assert rows, f"deploy/README.md: no table under {HEADING!r}"
    names: set[str] = set()
    for row in rows[1:]:  # the first row is the header
        names |= set(re.findall(r"`([a-z0-9-]+)`", row.split("|")[1]))
    return names


def test_every_run_config_key_has_a_row():
    missing = sorted(run_config_keys() - documented_keys())
    assert not missing, f"run-config keys with no row in deploy/README.md's {HEADING!r} table: {missing}"


def test_every_row_names_a_real_key():
    stale = sorted(documented_keys() - run_config_keys())
    assert not stale, f"deploy/README.md's {HEADING!r} table names keys pyproject.toml does not have: {stale}"


def test_the_issue_28_keys_are_explained():
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    for key, words in (
        ("far-ratio", ("nothing close enough", "rpe compose --far-ratio")),
        ("update-norm", ("frobenius",)),
    ):
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{key}`"))
        assert all(w in row for w in words), (key, row)
