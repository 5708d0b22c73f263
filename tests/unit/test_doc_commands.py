"""tests/support/doc_commands.py reads a guide's commands as a reader would run them."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.doc_commands import blocks, section_commands

GUIDE = """# Guide
## Several machines
Some text.
```bash
# a whole-line comment is dropped
python -m a \\
    --b c   # a trailing comment stays
echo hi
```
### On the site
```console
$ rpe x
output of rpe x, not a command
$ rpe y \\
  --z
```
```python
print("not shell")
```
## Other
```bash
echo other
```
"""


def test_commands_of_a_section_and_its_subsections(tmp_path: Path) -> None:
    doc = tmp_path / "g.md"
    doc.write_text(GUIDE)
    assert section_commands(doc, "Several machines") == [
        "python -m a --b c   # a trailing comment stays",
        "echo hi",
        "rpe x",
        "rpe y --z",
    ]
    assert section_commands(doc, "Other") == ["echo other"]
    assert [b.headings for b in blocks(doc)][1] == ("Guide", "Several machines", "On the site")


def test_a_renamed_section_fails_loudly(tmp_path: Path) -> None:
    doc = tmp_path / "g.md"
    doc.write_text(GUIDE)
    with pytest.raises(LookupError, match="Nowhere"):
        section_commands(doc, "Nowhere")
