"""What every side's ``rpe`` sub-commands share: the user-error type and a plain table printer.

The ``rpe`` parser itself is built in ``deploy.cli`` (the composition root); ``server.cli`` and
``client.cli`` register their own commands. Both sides raise :class:`CliError` for a user mistake,
which ``deploy.cli.main`` prints as one ``rpe: error: ...`` line with exit status 2.
"""

from __future__ import annotations

from typing import Any


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as left-aligned columns (``(none)`` when empty); floats to 4 significant digits."""
    if not rows:
        print("(none)")
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
