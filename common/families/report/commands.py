"""The report family's site commands: ``rpe generate`` writes impressions for new reports with the
base model + a (received) adapter, the task's own prompts, so predictions match what the site's
evaluation scored. Registered by ``client/use.py`` for every family that names its commands
(``Family.commands``); torch and transformers are imported inside the command only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from common.families.base import CommandError as SiteCommandError

ADAPTERS_DIR = "adapters"  # <site-dir>/adapters/<name>/: where a site keeps the adapters it received
DEFAULT_MODEL = "smollm2-135m-instruct"


def base_model_of(adapter_dir: Path, model: str | None) -> str:
    """The base model to use: ``--model``, else the adapter's ``base_model_name_or_path`` when it exists
    here (a directory or the packaged SmolLM2), else SmolLM2."""
    if model:
        return model
    try:
        from common.adapters.peft_io import read_peft_config  # bounded: a deep file is no RecursionError

        cfg = read_peft_config(adapter_dir / "adapter_config.json")
    except (OSError, ValueError) as exc:
        raise SiteCommandError(
            f"{adapter_dir}: no readable adapter_config.json ({exc}); pass a PEFT adapter "
            "directory, e.g. <site-dir>/adapters/<name>"
        ) from None
    name = cfg.get("base_model_name_or_path")
    if isinstance(name, str) and (name == DEFAULT_MODEL or Path(name).expanduser().is_dir()):
        return name
    return DEFAULT_MODEL


def generate_file(
    adapter_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
    force: bool = False,
    columns: str | None = None,
) -> dict[str, Any]:
    """Write one prediction per report of ``data`` (JSONL, ``prompt`` = findings; or a CSV export,
    ``columns`` its mapping as in the node-config key ``report-columns``) to ``out`` (JSONL).

    The adapter is added into the base weights (``common.families.report.evaluation.applied_delta``: θ0 + ΔW, the
    same function as PEFT's merged model) and the prompts are the task's own
    (``TextReportTask.build_prompt``), so predictions match what the site's evaluation scored. Output
    lines: ``{"uid", "group", "prediction"}`` (+ ``"target"`` when the input had one); written to a
    temporary file and renamed, so a half-written file never looks finished. An existing ``out`` is
    refused without ``force``, and an adapter of another family is refused naming its command, both
    before anything is loaded. Returns a summary (with ROUGE-L when every input line had a target).
    """
    from common.adapters import load_peft_adapter
    from common.families.adapterkind import check_adapter_family, check_out
    from common.families.report.data import DatasetFormatError
    from common.families.report.evaluation import applied_delta, generate
    from common.families.report.sitedata import parse_columns, read_reports
    from common.families.report.task import TextReportTask
    from common.models import load_base_model

    adir = Path(adapter_dir)
    if not adir.is_dir():
        raise SiteCommandError(
            f"adapter directory {adir} does not exist; received adapters are in "
            f"<site-dir>/{ADAPTERS_DIR}/ (see `rpe site status`)"
        )
    if batch_size < 1:
        raise SiteCommandError(f"--batch-size must be at least 1; got {batch_size}")
    target = check_out(out, force)
    if target.resolve() == Path(data).resolve():
        raise SiteCommandError(f"--out {out} is the --data file; the predictions go to a file of their own")
    check_adapter_family(adir, "report-text", "generate")
    try:
        examples = read_reports(data, parse_columns(columns), default_group="unknown")
    except DatasetFormatError as exc:
        raise SiteCommandError(f"{exc} (`rpe data check --data-path {data}` lists every problem)") from None
    if not examples:
        raise SiteCommandError(
            f"{data} holds no reports; one JSON object per line (or CSV row) with a 'prompt' (the findings)"
        )
    adapter = load_peft_adapter(adir)
    base = base_model_of(adir, model)
    net, tok = load_base_model(base)
    task = TextReportTask()
    prompts = [task.build_prompt(ex, tok) for ex in examples]
    start = time.perf_counter()
    with applied_delta(net, adapter):
        preds = generate(
            net, tok, prompts, max_new_tokens or task.max_new_tokens, batch_size=batch_size, progress=progress
        )
    seconds = time.perf_counter() - start
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex, pred in zip(examples, preds, strict=True):
            row = {"uid": ex.uid, "group": ex.group, "prediction": pred}
            if ex.target is not None:
                row["target"] = ex.target
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    summary: dict[str, Any] = {
        "out": str(target),
        "n": len(preds),
        "seconds": round(seconds, 2),
        "adapter": str(adir),
        "base_model": base,
    }
    if all(ex.target is not None for ex in examples):
        summary.update(task.score(preds, [ex.target for ex in examples]))
    return summary


def cmd_generate(args: argparse.Namespace) -> None:
    s = generate_file(
        args.adapter,
        args.data,
        args.out,
        model=args.model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
        force=args.force,
        columns=args.columns,
    )
    if args.json:
        print(json.dumps(s))
        return
    score = f"; ROUGE-L {s['rouge_l']:.4f} against the targets in the file" if "rouge_l" in s else ""
    print(f"wrote {s['n']} predictions to {s['out']} in {s['seconds']} s{score}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` to the ``rpe`` sub-commands."""
    g = subparsers.add_parser(
        "generate",
        help="write impressions for new reports with the base model + a (received) adapter",
        description="Greedy, batched generation with θ0 + ΔW of a PEFT adapter (e.g. the composed adapter the "
        "coordinator delivered to <site-dir>/adapters/<name>), using the task's own prompt.",
    )
    g.add_argument("--adapter", required=True, help="PEFT adapter directory")
    g.add_argument(
        "--data",
        required=True,
        help="reports: JSONL ('prompt' = findings; 'target' optional: scored) or CSV (docs/DATA.md)",
    )
    g.add_argument(
        "--columns",
        help="a CSV file's columns as FIELD=COLUMN pairs, e.g. prompt=Findings,target=Impression "
        "(default: common names such as findings, impression)",
    )
    g.add_argument("--out", required=True, help="predictions JSONL to write (an existing file needs --force)")
    g.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    g.add_argument(
        "--model",
        help="base model directory or 'smollm2-135m-instruct' (default: the adapter's base "
        "when present here, else SmolLM2)",
    )
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, help="default: the task's (32)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)
