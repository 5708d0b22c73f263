"""Every benchmark command a benchmarks/*.md document shows is one its module still accepts.

The benchmark documents quote the command behind each table (```bash blocks:
``python -m benchmarks.X --opts``). Nothing ran them, so an option renamed or dropped in the code
left a command a reader could not rerun. Here each command is read from its document (by
``support.doc_commands``) and handed to the module as a user would (``python -m benchmarks.X`` runs
the module as ``__main__``, ``python benchmarks/X.py`` the file) with ``ArgumentParser.parse_args``
patched to parse and then stop with a sentinel: the module's own parser judges the arguments, and no
benchmark runs (no model load, nothing written). Abbreviated options are refused here (argparse
would accept ``--retrieval`` for ``--retrieval-only`` until a second ``--retrieval...`` option
appears), so a document spells every option in full.

What a command may contain besides ``python -m benchmarks.X ARGS``: leading ``NAME=value``
environment assignments, ``nice -n N``, a shell variable set in the same block (``B="..."`` then
``$B --n 10``) and a trailing comment. Placeholders the documents use for a value the reader picks
are replaced from PLACEHOLDERS (small and explicit); anything else in a block fails the test, so a new
kind of command is looked at rather than skipped.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from support.doc_commands import blocks

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "benchmarks").glob("*.md"))

# A placeholder word (a whole argument) -> the value the test passes instead. Real names where the
# option takes one: the prostate sites (the hetero study's --only-site / --only-target).
PLACEHOLDERS = {
    "SITE": "BIDMC",
    "TARGET": "UCL",
    "W": "/tmp/seg-loo-workdir",
    "W2": "/tmp/seg-loo-workdir2",
    "REF": "HEAD",  # main_job --baseline REF: a git ref
}
# Inline `python -m benchmarks.X ...` spans are checked too, in these documents (the generated
# reports under benchmarks/ name the command that made them).
INLINE_DOCS = sorted((ROOT / "benchmarks").rglob("*.md")) + [ROOT / "docs" / "RESULTS.md", ROOT / "README.md"]
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_BENCH_SPAN = re.compile(
    r"^(?:[A-Za-z_]\w*=\S+\s+)*(?:nice -n \d+\s+)?(?:\S*/)?python3?\s+(?:-m\s+benchmarks\.|benchmarks/)"
)

_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_PYTHON = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
_SCRIPT = re.compile(r"^(?:\./)?benchmarks/(\w+)\.py$")


class Parsed(BaseException):
    """Raised by the patched parse_args once the module's parser accepted the arguments (a
    BaseException, so a benchmark's ``except Exception`` does not swallow it)."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def benchmark_invocation(command: str, variables: dict[str, str]) -> tuple[str, list[str]] | None:
    """``(module, args)`` of a benchmark command, ``None`` for a shell variable assignment.

    Raises ValueError for anything else, naming what was not understood."""
    words = shlex.split(command, comments=True)
    if len(words) == 1 and _ASSIGN.match(words[0]):  # B="..." : remembered for $B later in the block
        name, value = words[0].split("=", 1)
        variables[name] = value
        return None
    for name, value in variables.items():
        command = command.replace("${" + name + "}", value).replace("$" + name, value)
    words = shlex.split(command, comments=True)
    while words and _ENV.match(words[0]):
        words.pop(0)
    if words[:1] == ["nice"]:
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    if not words or not _PYTHON.match(words[0]):
        raise ValueError(f"not a python command: {command!r}")
    if words[1:2] == ["-m"] and len(words) > 2 and words[2].startswith("benchmarks."):
        module, args = words[2], words[3:]
    elif len(words) > 1 and _SCRIPT.match(words[1]):
        module, args = "benchmarks." + _SCRIPT.match(words[1]).group(1), words[2:]  # type: ignore[union-attr]
    else:
        raise ValueError(f"not a benchmark module or script: {command!r}")
    return module, [PLACEHOLDERS.get(a, a) for a in args]


def doc_commands() -> list[tuple[str, str, dict[str, str]]]:
    """``(where, command, shell variables set before it in its block)`` for every command of every
    shell block of benchmarks/*.md."""
    found = []
    for doc in DOCS:
        for block in blocks(doc):
            variables: dict[str, str] = {}
            for cmd in block.commands:
                found.append((f"{doc.relative_to(ROOT)}:{block.line}", cmd, dict(variables)))
                words = shlex.split(cmd, comments=True)
                if len(words) == 1 and _ASSIGN.match(words[0]):
                    benchmark_invocation(cmd, variables)
    return found


def parse_with(module: str, args: list[str]) -> argparse.Namespace:
    """Run ``module`` as ``__main__`` with ``args`` until its parser has parsed them.

    Raises AssertionError with the parser's own message when it refuses them."""
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"no module {module} (no {path.relative_to(ROOT)})"
    source = path.read_text(encoding="utf-8")
    assert "parse_args(" in source, f"{module} has no argument parser: this test would run it"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        self.allow_abbrev = False
        raise Parsed(original(self, args, namespace))

    err = io.StringIO()
    saved_argv, saved_path, saved_env = sys.argv, list(sys.path), dict(os.environ)
    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    try:
        sys.path.insert(0, str(ROOT))  # as `python -m` from the repository root
        sys.argv = [module.replace(".", "/") + ".py", *args]
        with warnings.catch_warnings(), redirect_stderr(err), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules"
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except Parsed as done:
        return done.namespace
    except SystemExit as exit_:
        said = [ln for ln in err.getvalue().splitlines() if "error:" in ln] or err.getvalue().splitlines()[-1:]
        raise AssertionError(f"{module} refused {args}: {' '.join(said)} (exit {exit_.code})") from None
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
    raise AssertionError(f"{module} returned without parsing its arguments")


def inline_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every inline code span of INLINE_DOCS that is a benchmark command
    (outside fenced blocks, which ``doc_commands`` reads). Usage notation is read as a command:
    ``[--opt X]`` is checked with the option; a span that ends in ``...`` (more arguments elided) is
    not a command and is left out."""
    found = []
    for doc in INLINE_DOCS:
        text, outside, fence = doc.read_text(encoding="utf-8"), [], None
        for line in text.splitlines():
            opening = re.match(r"^\s*(```|~~~)", line)
            if fence is None and opening:
                fence = opening.group(1)
            elif fence is not None and line.lstrip().startswith(fence):
                fence = None
            else:
                outside.append("" if fence else line)
        for span in _INLINE.finditer("\n".join(outside)):
            cmd = " ".join(span.group(1).split())
            if _BENCH_SPAN.match(cmd) and not cmd.endswith("..."):
                line_no = "\n".join(outside)[: span.start()].count("\n") + 1
                found.append((f"{doc.relative_to(ROOT)}:{line_no}", cmd.replace("[", "").replace("]", "")))
    return found


COMMANDS = doc_commands()
INLINE = inline_commands()


def test_the_documents_have_benchmark_commands() -> None:
    # A renamed fence language or a moved folder must not turn this file into a no-op.
    assert len(COMMANDS) >= 20, COMMANDS
    assert {w.split(":")[0] for w, _, _ in COMMANDS} >= {"benchmarks/ZERO_SHOT.md", "benchmarks/README.md"}


@pytest.mark.parametrize("where,command,variables", COMMANDS, ids=[f"{w}:{i}" for i, (w, _, _) in enumerate(COMMANDS)])
def test_documented_benchmark_command_parses(where: str, command: str, variables: dict[str, str]) -> None:
    try:
        found = benchmark_invocation(command, dict(variables))
    except ValueError as exc:
        pytest.fail(f"{where}: {exc}; a benchmark document's shell blocks hold benchmark commands only")
    if found is None:
        return
    module, args = found
    try:
        parse_with(module, args)
    except AssertionError as exc:
        pytest.fail(f"{where}: {command!r}: {exc}")


@pytest.mark.parametrize("where,command", INLINE, ids=[f"{w}:{i}" for i, (w, _) in enumerate(INLINE)])
def test_inline_benchmark_command_parses(where: str, command: str) -> None:
    module, args = benchmark_invocation(command, {})  # type: ignore[misc]
    try:
        parse_with(module, args)
    except AssertionError as exc:
        pytest.fail(f"{where}: `{command}`: {exc}")


def test_inline_commands_are_found() -> None:
    assert len(INLINE) >= 30, INLINE
    cmds = [c for _, c in INLINE]
    assert 'python -m benchmarks.main_job --baseline REF --sets "report;report,segmentation"' in cmds
    assert not any(c.startswith("python -m benchmarks.registry --worker") for c in cmds)  # ends in "..."
    assert not any("\n" in c for c in cmds)


# --- the checker itself: it must refuse what a reader could not run ------------------------------


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-option"):
        parse_with("benchmarks.zero_shot_decoys", ["--decoys", "0,8", "--no-such-option"])


def test_an_abbreviated_option_is_refused() -> None:
    assert parse_with("benchmarks.zero_shot_decoys", ["--retrieval-only"]).retrieval_only is True
    with pytest.raises(AssertionError, match="refused"):
        parse_with("benchmarks.zero_shot_decoys", ["--retrieval"])


def test_a_bad_value_is_refused() -> None:
    with pytest.raises(AssertionError, match="invalid choice"):
        parse_with("benchmarks.zero_shot", ["--profile", "huge"])
    with pytest.raises(AssertionError, match="invalid int value"):
        parse_with("benchmarks.zero_shot_decoys", ["--library", "four"])


def test_a_missing_module_or_other_command_is_refused() -> None:
    with pytest.raises(AssertionError, match="no module benchmarks.no_such_benchmark"):
        parse_with("benchmarks.no_such_benchmark", [])
    for cmd in ("rm -rf benchmarks/zero_shot", "python -m server.console --port 1", "cd W && ls"):
        with pytest.raises(ValueError):
            benchmark_invocation(cmd, {})


def test_the_command_forms_the_documents_use() -> None:
    v: dict[str, str] = {}
    assert benchmark_invocation('B="nice -n 5 .venv/bin/python -m benchmarks.federation_scale --idle 30"', v) is None
    assert benchmark_invocation("$B --n 10   # comment", v) == (
        "benchmarks.federation_scale",
        ["--idle", "30", "--n", "10"],
    )
    assert benchmark_invocation("OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.zindex --queries 3", {}) == (
        "benchmarks.zindex",
        ["--queries", "3"],
    )
    assert benchmark_invocation("python benchmarks/run_all.py --only compose", {}) == (
        "benchmarks.run_all",
        ["--only", "compose"],
    )
    assert benchmark_invocation("python -m benchmarks.zero_shot_hetero --only-site SITE", {})[1] == [  # type: ignore[index]
        "--only-site",
        PLACEHOLDERS["SITE"],
    ]
