"""The README for its three users: its first screen answers what, for whom, the requirements (with
the set-up's apt-get as root) and gives the two commands; it has a start per role, troubleshooting
and a licence section; every relative link in it and in docs/RESULTS.md reaches a file (and the
heading an anchor names); and the only shell blocks it has are the two commands and the role
sections' blocks, which tests/integration/test_demo_delivery.py runs on the demo's output (the two
commands: tests/integration/test_data_demo.py runs the first from the README; the second is CI's
own command, checked here to be what .ci/run runs).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from support.doc_commands import blocks, section_commands

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "RESULTS.md"
TWO_COMMANDS = ["bash scripts/demo.sh", "bash scripts/test.sh"]
#: the README sections whose shell blocks the demo test runs (keep in step with test_demo_delivery.py)
RUN_ON_THE_DEMO = ("A hospital site", "The coordinator", "The privacy auditor")


def _first_screen() -> str:
    text = README.read_text()
    return text[: text.index("\n## ")]  # everything before the first section


def test_the_first_screen_says_what_for_whom_requirements_and_the_two_commands():
    screen = _first_screen()
    for needed in ("LoRA", "hospital", "**For whom:**", "**Requirements:**", "Python 3.11", "Linux", "2 CPU"):
        assert needed in screen, needed
    assert re.search(r"\b24 GB\b", screen) and re.search(r"\d+ GB of free disk", screen)
    assert "apt-get" in screen and "as root" in screen  # set-up installs Debian packages as root: said
    first = blocks(README)[0]
    assert [c.split("#")[0].strip() for c in first.commands] == TWO_COMMANDS
    assert first.line < 40  # on the first screen


def test_the_second_command_is_what_ci_runs():
    assert "exec bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh", "scripts/setup.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True).returncode == 0, script


def test_setup_says_what_it_installs_as_root_as_the_readme_does():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for package in ("chromium", "nginx", "nftables"):
        assert package in setup and package in _first_screen()
    assert '"$(id -u)" = 0' in setup and "apt-get install" in setup


def test_a_start_per_role_troubleshooting_and_licence():
    headings = [m.group(1) for m in re.finditer(r"^## (.+)$", README.read_text(), re.M)]
    for needed in (*RUN_ON_THE_DEMO, "Troubleshooting", "Licence and data", "Scale"):
        assert needed in headings, needed
    text = README.read_text()
    assert "Apache-2.0" in text and "CC BY-NC-ND 4.0" in text and "SOURCE.md" in text
    for doc in ("deploy/README.md", "docs/DATA.md", "docs/THREAT_MODEL.md", "docs/RESULTS.md", "benchmarks/README.md"):
        assert f"]({doc}" in text, doc
    assert "](benchmarks/FEDERATION_SCALE.md)" in text  # the scale section quotes the measured limit


def test_every_shell_block_of_the_readme_is_one_that_a_test_runs():
    ran = set(TWO_COMMANDS) | {c for s in RUN_ON_THE_DEMO for c in section_commands(README, s)}
    for block in blocks(README):
        for cmd in block.commands:
            assert cmd.split("  #")[0].strip() in {c.split("  #")[0].strip() for c in ran}, (block.line, cmd)
    assert not [b for b in blocks(RESULTS) if b.commands], "docs/RESULTS.md reports; it tells no one to run a block"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", [README, RESULTS], ids=["README", "RESULTS"])
def test_every_relative_link_reaches_a_file_and_its_heading(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {link} -> {path} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: {link}: no heading with anchor #{anchor} in {path.name}"
