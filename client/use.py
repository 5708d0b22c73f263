"""Site commands for what a hospital receives: ``rpe generate`` and ``rpe site status``.

Why on the client side: both run at the site, next to its reports, and read only the site's own
files — the composed adapter the coordinator delivered (``<site-dir>/adapters/<name>/``, see
``client/app.py``) and the site's egress log (``<site-dir>/egress.jsonl``) — so a site can use
and account for the federation without asking the coordinator anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

EGRESS_FILE = "egress.jsonl"  # client/app.py writes <site-dir>/egress.jsonl and <site-dir>/adapters/<name>/
ADAPTERS_DIR = "adapters"
PROVENANCE_FILE = "rpe-provenance.json"
DEFAULT_MODEL = "smollm2-135m-instruct"


class SiteCommandError(ValueError):
    """A site command cannot run as asked (missing directory, unreadable adapter, bad data file)."""


# -- rpe generate -------------------------------------------------------------------------------
def base_model_of(adapter_dir: Path, model: str | None) -> str:
    """The base model to use: ``--model``, else the adapter's ``base_model_name_or_path`` when it exists
    here (a directory or the packaged SmolLM2), else SmolLM2."""
    if model:
        return model
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
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
) -> dict[str, Any]:
    """Write one prediction per report of ``data`` (JSONL, ``prompt`` = findings) to ``out`` (JSONL).

    The adapter is added into the base weights (``common.families.report.evaluation.applied_delta``: θ0 + ΔW, the
    same function as PEFT's merged model) and the prompts are the task's own
    (``TextReportTask.build_prompt``), so predictions match what the site's evaluation scored. Output
    lines: ``{"uid", "group", "prediction"}`` (+ ``"target"`` when the input had one); written to a
    temporary file and renamed, so a half-written file never looks finished. Returns a summary
    (with ROUGE-L when every input line had a target).
    """
    from common.adapters import load_peft_adapter
    from common.families.report.data import read_jsonl
    from common.families.report.evaluation import applied_delta, generate
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
    examples = read_jsonl(data, default_group="unknown")
    if not examples:
        raise SiteCommandError(f"{data} holds no reports; one JSON object per line with a 'prompt' (the findings)")
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
    target = Path(out)
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _image_files(paths: list[str]) -> list[Path]:
    """Every image named, a directory standing for the images directly in it (sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise SiteCommandError(f"{p} does not exist; pass image files or a directory of images")
    if not out:
        raise SiteCommandError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return out


def _read_image(path: Path) -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("L") if im.mode not in ("L", "RGB") else im)
    except (OSError, UnidentifiedImageError) as exc:
        raise SiteCommandError(f"{path}: not a readable image ({exc})") from None
    if arr.ndim not in (2, 3):
        raise SiteCommandError(f"{path}: expected a grey or RGB image, got shape {arr.shape}")
    return arr


def segment_files(
    adapter_dir: str | os.PathLike[str],
    images: list[str],
    out: str | os.PathLike[str],
    model: str | None = None,
    prompt: str = "center",
    truth: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write one binary mask per image (``<out>/<stem>_mask.png``, 0/255 at the image's own size)
    with the SAM base + a (received) segmentation adapter, and ``<out>/masks.jsonl`` (one line per
    image: file, mask, foreground fraction, and DICE when ``truth`` holds a mask of the same name).

    The adapter is merged exactly (θ0 + ΔW, ``common.families.segmentation.task.predict``, the function the site's
    evaluation scored with); ``prompt`` is the box prompt (``center``: a fixed centre box covering
    half of each side, what the federation trains and scores with; ``none``). Each file is written
    under a temporary name and renamed, so a half-written mask never looks finished.
    """
    import numpy as np
    from PIL import Image

    from common.adapters import load_peft_adapter
    from common.families.segmentation import sam
    from common.families.segmentation.task import PromptSpec, SegmentationConfigError, dice, predict

    adir = Path(adapter_dir)
    if not (adir / "adapter_config.json").is_file():
        raise SiteCommandError(
            f"{adir} is not a PEFT adapter directory (no adapter_config.json); received "
            f"adapters are in <site-dir>/{ADAPTERS_DIR}/ (see `rpe site status`)"
        )
    try:
        spec = PromptSpec(mode=prompt)
    except SegmentationConfigError as exc:
        raise SiteCommandError(f"--prompt: {exc}") from None
    files = _image_files(images)
    base = (
        model or json.loads((adir / "adapter_config.json").read_text()).get("base_model_name_or_path") or sam.LITEMEDSAM
    )
    try:
        net = sam.load_sam(base)
    except (OSError, ValueError, sam.SamCheckpointError) as exc:
        raise SiteCommandError(
            f"base model {base!r}: {exc}; pass --model (a SAM-style checkpoint directory or 'litemedsam')"
        ) from None
    adapter = load_peft_adapter(adir)
    missing = [m for m in adapter.modules if m not in dict(net.named_modules())]
    if missing:
        raise SiteCommandError(
            f"the adapter names modules the base {base!r} lacks (e.g. {missing[0]}): it is not "
            "a segmentation adapter for this model"
        )
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for i, f in enumerate(files, start=1):
        image = _read_image(f)
        mask = predict(net, adapter, [image], None, spec)[0]
        name = f"{f.stem}_mask.png"
        tmp = target / f".{name}.tmp-{os.getpid()}"
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        os.replace(tmp, target / name)
        row: dict[str, Any] = {"image": str(f), "mask": name, "foreground": round(float(mask.mean()), 6)}
        ref = Path(truth) / f.name if truth else None
        if ref is not None and ref.is_file():
            row["dice"] = round(dice(mask, _read_image(ref) > 0), 6)
        rows.append(row)
        if progress:
            print(
                f"[rpe] segment [{i}/{len(files)}] {f.name}: {100 * row['foreground']:.1f} % foreground"
                + (f", DICE {row['dice']:.4f}" if "dice" in row else ""),
                file=sys.stderr,
                flush=True,
            )
    index = target / "masks.jsonl"
    tmp = target / f".masks.jsonl.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, index)
    summary: dict[str, Any] = {
        "out": str(target),
        "n": len(rows),
        "seconds": round(time.perf_counter() - start, 2),
        "adapter": str(adir),
        "base_model": str(base),
    }
    scored = [r["dice"] for r in rows if "dice" in r]
    if scored:
        summary["dice"] = float(np.mean(scored))
    return summary


def cmd_segment(args: argparse.Namespace) -> None:
    s = segment_files(
        args.adapter,
        args.images,
        args.out,
        model=args.model,
        prompt=args.prompt,
        truth=args.masks,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(s))
        return
    score = f"; mean DICE {s['dice']:.4f} against {args.masks}" if "dice" in s else ""
    print(f"wrote {s['n']} masks to {s['out']} (index: masks.jsonl) in {s['seconds']} s{score}")


def cmd_generate(args: argparse.Namespace) -> None:
    s = generate_file(
        args.adapter,
        args.data,
        args.out,
        model=args.model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(s))
        return
    score = f"; ROUGE-L {s['rouge_l']:.4f} against the targets in the file" if "rouge_l" in s else ""
    print(f"wrote {s['n']} predictions to {s['out']} in {s['seconds']} s{score}")


# -- rpe site status ----------------------------------------------------------------------------
def site_status(site_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What this site released (egress log), the ε it spent, and the adapters it holds."""
    from common.privacy import read_egress, spent_from_egress

    root = Path(site_dir).expanduser()
    if not root.is_dir():
        raise SiteCommandError(f"site directory {root} does not exist; it is the SuperNode's node-config site-dir")
    egress_path = root / EGRESS_FILE
    lines = read_egress(egress_path) if egress_path.is_file() else []
    by_kind: Counter[str] = Counter()
    by_outcome: Counter[str] = Counter()
    for line in lines:
        by_kind[str(line.get("message_type"))] += 1
        by_outcome[str((line.get("extra") or {}).get("outcome", "ok"))] += 1
    spent = spent_from_egress(lines)
    adapters = []
    adir = root / ADAPTERS_DIR
    for d in sorted(adir.iterdir()) if adir.is_dir() else []:
        if not (d / "adapter_config.json").is_file():
            continue
        prov: dict[str, Any] = {}
        if (d / PROVENANCE_FILE).is_file():
            try:
                prov = json.loads((d / PROVENANCE_FILE).read_text())
            except ValueError:
                prov = {"error": f"{PROVENANCE_FILE} is not JSON"}
        cfg = json.loads((d / "adapter_config.json").read_text())
        received = prov.get("received_at")
        adapters.append(
            {
                "name": d.name,
                "kind": "own (trained here)" if d.name.startswith("own-") else "received",
                "strategy": prov.get("strategy"),
                "sources": prov.get("sources"),
                "weights": prov.get("weights"),
                "blob_sha256": prov.get("blob_sha256"),
                "rank": cfg.get("r"),
                "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received)) if received else None,
            }
        )
    return {
        "site_dir": str(root),
        "egress_log": str(egress_path) if lines else None,
        "replies": len(lines),
        "by_message_type": dict(by_kind),
        "by_outcome": dict(by_outcome),
        "bytes_sent": sum(int(line.get("total_bytes") or 0) for line in lines),
        "last_reply": lines[-1].get("ts") if lines else None,
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": len(spent.releases),
        "non_private": spent.non_private,
        "adapters": adapters,
    }


def format_status(s: dict[str, Any]) -> str:
    """The text ``rpe site status`` prints."""
    out = [f"site directory {s['site_dir']}"]
    if not s["replies"]:
        out.append("  egress log: none yet (this site has sent nothing)")
    else:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s["by_message_type"].items()))
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(s["by_outcome"].items()))
        out.append(
            f"  sent {s['replies']} replies ({kinds}; {outcomes}), {s['bytes_sent']:,} bytes, last {s['last_reply']}"
        )
    eps = "∞ (some releases without differential privacy)" if math.isinf(s["epsilon"]) else f"{s['epsilon']:.3f}"
    out.append(f"  privacy: {s['releases']} data-derived release(s), ε spent = {eps} at δ = {s['delta']:g}")
    for np_ in s["non_private"][:5]:
        out.append(f"    not private: {np_}")
    if not s["adapters"]:
        out.append("  adapters: none stored")
    for a in s["adapters"]:
        src = ""
        if a["sources"]:
            w = a["weights"] or []
            src = " from " + ", ".join(
                f"{n} ({x:+.3f})" if isinstance(x, (int, float)) else str(n)
                for n, x in zip(a["sources"], w + [None] * (len(a["sources"]) - len(w)))
            )
        when = f", received {a['received_at']}" if a["received_at"] else ""
        strat = f" {a['strategy']}" if a["strategy"] else ""
        out.append(f"  adapter {a['name']}: {a['kind']}{strat}, rank {a['rank']}{src}{when}")
    return "\n".join(out)


def cmd_site_status(args: argparse.Namespace) -> None:
    s = site_status(args.site_dir)
    if args.json:
        print(json.dumps(s, default=str))
    else:
        print(format_status(s))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``segment`` and ``site status`` to the ``rpe`` sub-commands."""
    g = subparsers.add_parser(
        "generate",
        help="write impressions for new reports with the base model + a (received) adapter",
        description="Greedy, batched generation with θ0 + ΔW of a PEFT adapter (e.g. the composed adapter the "
        "coordinator delivered to <site-dir>/adapters/<name>), using the task's own prompt.",
    )
    g.add_argument("--adapter", required=True, help="PEFT adapter directory")
    g.add_argument("--data", required=True, help="JSONL reports ('prompt' = findings; 'target' optional: scored)")
    g.add_argument("--out", required=True, help="predictions JSONL to write")
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

    sg = subparsers.add_parser(
        "segment",
        help="write masks for new images with the SAM base + a (received) segmentation adapter",
        description="Binary masks (0/255 PNG, each image's own size) with θ0 + ΔW of a segmentation adapter (e.g. "
        "the composition the coordinator delivered to <site-dir>/adapters/<name>), the box prompt the "
        "federation trains and scores with, and masks.jsonl as an index.",
    )
    sg.add_argument("--adapter", required=True, help="PEFT adapter directory of a segmentation adapter")
    sg.add_argument("--images", required=True, nargs="+", help="image files, or directories of images")
    sg.add_argument("--out", required=True, help="directory for <stem>_mask.png and masks.jsonl")
    sg.add_argument(
        "--model",
        help="SAM-style base: 'litemedsam' or a checkpoint directory (default: the adapter's base_model_name_or_path)",
    )
    sg.add_argument(
        "--prompt",
        default="center",
        choices=["center", "none"],
        help="box prompt (default center: half of each side, as in training and scoring)",
    )
    sg.add_argument("--masks", help="directory of reference masks with the images' file names: DICE per image")
    sg.add_argument("--quiet", action="store_true", help="no progress lines")
    sg.add_argument("--json", action="store_true")
    sg.set_defaults(func=cmd_segment)

    s = subparsers.add_parser(
        "site",
        help="site-side views of the site's own files",
        description="Read only the site's own directory: nothing is sent anywhere.",
    )
    ssub = s.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    st = ssub.add_parser(
        "status",
        help="what this site released, the ε it spent, the adapters it holds",
        description="From <site-dir>/egress.jsonl and <site-dir>/adapters/.",
    )
    st.add_argument("--site-dir", required=True, help="the SuperNode's node-config site-dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_site_status)
