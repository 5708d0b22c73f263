"""The commands a document tells its reader to run, taken from the document itself.

"The documented path is the tested path": a test that runs a guide's commands reads them from the
guide (``bash``/``sh``/``console`` fenced blocks), so a command changed in the guide but not in the
code, or the other way round, fails a test. A logical command is one line, with backslash
continuations joined; blank lines and whole-line comments are dropped; a trailing comment stays
(bash ignores it). ``$ `` prompts (``console`` blocks) are removed, and their output lines dropped.

    >>> cmds = section_commands(ROOT / "deploy" / "README.md", "Several machines")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SHELL_LANGS = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Block:
    """One fenced shell block: the heading path it sits under, its language and its commands."""

    headings: tuple[str, ...]
    lang: str
    commands: tuple[str, ...]
    line: int  # 1-based line of the opening fence


def _logical_lines(body: list[str], console: bool) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in body:
        line = raw.rstrip()
        if console and not pending:
            if not line.lstrip().startswith("$ "):
                continue  # output of the previous command
            line = line.lstrip()[2:]
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append((pending + line.strip()) if pending else line.strip())
        pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out


def blocks(path: Path) -> list[Block]:
    """Every shell block of a Markdown file, in order, with the headings above it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    stack: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            marker, lang, start = fence.group(2), fence.group(3).lower(), i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(marker):
                body.append(lines[i])
                i += 1
            if lang in SHELL_LANGS:
                cmds = _logical_lines(body, console=lang == "console")
                found.append(Block(tuple(h for _, h in stack), lang, tuple(cmds), start + 1))
            i += 1
            continue
        head = _HEADING.match(lines[i])
        if head:
            level = len(head.group(1))
            stack = [(lv, h) for lv, h in stack if lv < level] + [(level, head.group(2))]
        i += 1
    return found


def section_blocks(path: Path, heading: str) -> list[Block]:
    """The shell blocks under every heading that starts with ``heading`` (sub-sections included).

    Raises ``LookupError`` when no heading matches, so a renamed section fails the test loudly."""
    all_blocks = blocks(path)
    text = Path(path).read_text(encoding="utf-8")
    if not any(_HEADING.match(ln) and _HEADING.match(ln).group(2).startswith(heading) for ln in text.splitlines()):  # type: ignore[union-attr]
        raise LookupError(f"{path}: no heading starts with {heading!r}")
    return [b for b in all_blocks if any(h.startswith(heading) for h in b.headings)]


def section_commands(path: Path, heading: str) -> list[str]:
    """Every command of the shell blocks under ``heading``, in document order."""
    return [c for b in section_blocks(path, heading) for c in b.commands]
