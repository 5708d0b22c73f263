"""The segmentation family's site commands: ``rpe segment`` writes masks for new images with the
SAM base + a (received) segmentation adapter, the box prompt the federation trains and scores with.
Registered by ``client/use.py`` for every family that names its commands (``Family.commands``);
torch is imported inside the command only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.families.base import CommandError as SiteCommandError

ADAPTERS_DIR = "adapters"  # <site-dir>/adapters/<name>/: where a site keeps the adapters it received


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
    from common.families.segmentation.data import ImageError, open_image

    try:  # bounded: a decompression bomb or a FIFO is a clear error, never a traceback or a hang
        arr = open_image(path, "image", convert=True)
    except ImageError as exc:
        raise SiteCommandError(str(exc)) from None
    if arr.ndim not in (2, 3):
        raise SiteCommandError(f"{path}: expected a grey or RGB image, got shape {arr.shape}")
    return arr


def _adapter_base(adir: Path) -> Any:
    """``base_model_name_or_path`` of a received adapter, read through the bounded JSON reader."""
    from common.files.safeio import UnsafeInputError, loads_json, read_regular_file

    path = adir / "adapter_config.json"
    try:
        cfg = loads_json(read_regular_file(path, 1 << 20, "adapter config"), f"adapter config {path}")
    except UnsafeInputError as exc:
        raise SiteCommandError(str(exc)) from None
    if not isinstance(cfg, dict):
        raise SiteCommandError(f"adapter config {path}: expected a JSON object")
    return cfg.get("base_model_name_or_path")


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
    base = model or _adapter_base(adir) or sam.LITEMEDSAM
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` to the ``rpe`` sub-commands."""
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
