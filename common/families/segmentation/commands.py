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
#: slices per prediction call: one, exactly as for a PNG of the same slice (batching may move a logit near 0)
VOLUME_BATCH = 1


def _inputs(paths: list[str]) -> list[tuple[str, Path]]:
    """``(kind, path)`` of every input named: ``image`` (PNG, JPEG ...), ``nifti`` (.nii, .nii.gz) or
    ``dicom`` (a folder holding one DICOM series); a folder of those stands for each directly in it."""
    from common.families.segmentation.dicomio import is_dicom_dir
    from common.families.segmentation.volumes import is_nifti

    def kind(p: Path) -> str | None:
        if p.is_file():
            return "nifti" if is_nifti(p) else "image" if p.suffix.lower() in IMAGE_SUFFIXES else None
        return "dicom" if p.is_dir() and is_dicom_dir(p) else None

    out: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            out.append((kind(p) or "image", p))  # a file of another suffix: the image reader names it
        elif p.is_dir():
            k = kind(p)
            if k:
                out.append((k, p))
                continue
            for q in sorted(p.iterdir()):
                kq = kind(q)
                if kq:
                    out.append((kq, q))
        else:
            raise SiteCommandError(
                f"{p} does not exist; pass image files, NIfTI volumes, DICOM series folders or a folder of them"
            )
    if not out:
        raise SiteCommandError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}), NIfTI volumes (.nii, .nii.gz) or DICOM series in {', '.join(paths)}"
        )
    return out


def _out_name(kind: str, path: Path) -> str:
    from common.families.segmentation.volumes import volume_stem

    if kind == "nifti":
        return f"{volume_stem(path)}_mask.nii.gz"
    if kind == "dicom":
        return f"{path.name}_seg.dcm"
    return f"{path.stem}_mask.png"


def _slice_dir(kind: str, path: Path) -> str:
    """``--png``: the folder of a volume's per-slice PNG masks."""
    return _out_name(kind, path).split("_mask.nii.gz")[0].split("_seg.dcm")[0] + "_slices"


def _image_files(paths: list[str]) -> list[Path]:
    """Every 2-D image named, a directory standing for the images directly in it (sorted)."""
    return [p for k, p in _inputs(paths) if k == "image"]


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


_SAM_PREFIXES = ("image_encoder.", "mask_decoder.", "prompt_encoder.")


def _check_adapter(adir: Path) -> Any:
    """The adapter, refused (before any model is loaded) when it is another family's, naming the
    command that fits it."""
    from common.adapters import load_peft_adapter
    from common.families.adapterkind import check_adapter_family

    check_adapter_family(adir, "segmentation", "segment")
    adapter = load_peft_adapter(adir)
    if adapter.modules and not any(m.startswith(_SAM_PREFIXES) for m in adapter.modules):
        example = next(iter(adapter.modules))
        raise SiteCommandError(
            f"{adir} adapts {example} ..., a language model's module, not a SAM model's: it is a report "
            f"adapter; use `rpe generate --adapter {adir} ...` (rpe segment takes a segmentation adapter)"
        )
    return adapter


def _reference(truth: str | None, kind: str, path: Path) -> Path | None:
    if not truth:
        return None
    if kind == "image":
        ref = Path(truth) / path.name
        return ref if ref.is_file() else None
    from common.families.segmentation.volumes import volume_stem

    for suffix in (".nii.gz", ".nii"):
        ref = Path(truth) / f"{volume_stem(path)}{suffix}"
        if ref.is_file():
            return ref
    return None


def segment_files(
    adapter_dir: str | os.PathLike[str],
    images: list[str],
    out: str | os.PathLike[str],
    model: str | None = None,
    prompt: str = "center",
    truth: str | None = None,
    progress: bool = True,
    mask_foreground: str = "nonzero",
    window: str = "auto",
    axis: str = "axial",
    force: bool = False,
    png: bool = False,
) -> dict[str, Any]:
    """Write one mask per input in the input's own geometry, and ``<out>/masks.jsonl`` (one line per
    input: file, mask, format, foreground fraction, and DICE when ``truth`` holds a reference of the
    same name):

    - a 2-D image: ``<stem>_mask.png`` (0/255 at the image's size);
    - a NIfTI volume: ``<stem>_mask.nii.gz`` (uint8 0/1, the volume's shape, affine and header),
      every slice along ``axis`` segmented after ``window``;
    - a DICOM series folder: ``<folder>_seg.dcm``, a DICOM-SEG (highdicom) with one frame per source
      instance, referencing it.

    The adapter is merged exactly (θ0 + ΔW, ``common.families.segmentation.task.predict``, the
    function the site's evaluation scored with); ``prompt`` is the box prompt (``center``: a fixed
    centre box covering half of each side, what the federation trains and scores with; ``none``).
    ``mask_foreground`` says which value(s) of a reference mask or label map are the object
    (``nonzero``, ``0`` for masks stored inverted, ``5`` for one label); a reference that is mostly
    object is warned about (``warnings`` in the summary and on stderr). Outputs that exist are
    refused without ``force``, before anything is loaded; each file is written under a temporary name
    and renamed, so a half-written mask never looks finished.
    """
    import numpy as np
    from PIL import Image

    from common.families.segmentation import sam
    from common.families.segmentation.task import PromptSpec, SegmentationConfigError, dice, predict, with_adapter
    from common.families.segmentation.volumes import (
        Foreground,
        VolumeError,
        check_axis,
        mostly_foreground,
        parse_window,
    )

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
    try:
        fg = Foreground.parse(mask_foreground)
        parse_window(window)
        check_axis(axis)
    except VolumeError as exc:
        raise SiteCommandError(str(exc)) from None
    if truth is not None and not Path(truth).is_dir():
        raise SiteCommandError(f"--masks {truth} is not a folder; name the folder of reference masks")
    inputs = _inputs(images)
    names: dict[str, Path] = {}
    for kind, path in inputs:
        name = _out_name(kind, path)
        if name in names:
            raise SiteCommandError(f"{names[name]} and {path} would both be written as {name}; segment them apart")
        names[name] = path
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise SiteCommandError(f"--out {target} exists and is not a directory")
    slice_dirs = [_slice_dir(k, p) for k, p in inputs if k != "image"] if png else []
    existing = [n for n in [*names, *slice_dirs, "masks.jsonl"] if (target / n).exists()]
    if existing and not force:
        raise SiteCommandError(
            f"--out {target} already holds {existing[0]}"
            + (f" and {len(existing) - 1} more of this run's outputs" if len(existing) > 1 else "")
            + ": refusing to overwrite; choose another --out, or pass --force"
        )
    config_base = _adapter_base(adir)  # the bounded reader first: a malformed config is named, not a traceback
    adapter = _check_adapter(adir)
    base = model or config_base or sam.LITEMEDSAM
    try:
        net = sam.load_sam(base)
    except (OSError, ValueError, sam.SamCheckpointError) as exc:
        raise SiteCommandError(
            f"base model {base!r}: {exc}; pass --model (a SAM-style checkpoint directory or 'litemedsam')"
        ) from None
    missing = [m for m in adapter.modules if m not in dict(net.named_modules())]
    if missing:
        raise SiteCommandError(
            f"the adapter names modules the base {base!r} lacks (e.g. {missing[0]}): it is not "
            "a segmentation adapter for this model"
        )
    target.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    merged = with_adapter(net, adapter)  # θ0 + ΔW once, not per image
    rows, warnings = [], []
    for i, (kind, f) in enumerate(inputs, start=1):
        name = _out_name(kind, f)
        ref = _reference(truth, kind, f)
        row: dict[str, Any] = {"image": str(f), "mask": name}
        if truth is not None and ref is None:
            expected = f.name if kind == "image" else f"{_out_name(kind, f).rsplit('_', 1)[0]}.nii.gz"
            warnings.append(f"no reference mask {expected} in {truth}: {f.name} is not scored")
        if kind == "image":
            image = _read_image(f)
            mask = predict(net, adapter, [image], None, spec, merged=merged)[0]
            tmp = target / f".{name}.tmp-{os.getpid()}"
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
            os.replace(tmp, target / name)
            row.update(format="png", foreground=round(float(mask.mean()), 6))
            if ref is not None:
                truth_arr = _read_image(ref)
                truth_mask = fg(truth_arr if truth_arr.ndim == 2 else truth_arr[..., 0])
                row["dice"] = round(dice(mask, truth_mask), 6)
                row["reference_foreground"] = round(float(truth_mask.mean()), 6)
                warn = mostly_foreground(float(truth_mask.mean()), f"reference mask {ref}", fg)
                if warn:
                    row["warning"] = warn
                    warnings.append(warn)
        else:
            row.update(
                _segment_volume(net, adapter, merged, spec, kind, f, target, name, window, axis, fg, ref, warnings, png)
            )
        rows.append(row)
        if progress:
            print(
                f"[rpe] segment [{i}/{len(inputs)}] {f.name}: {100 * row['foreground']:.1f} % foreground"
                + (f", DICE {row['dice']:.4f}" if "dice" in row else ""),
                file=sys.stderr,
                flush=True,
            )
        if "warning" in row:
            print(f"[rpe] warning: {row['warning']}", file=sys.stderr, flush=True)
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
        "mask_foreground": mask_foreground,
        "warnings": warnings,
    }
    scored = [r["dice"] for r in rows if "dice" in r]
    if scored:
        summary["dice"] = float(np.mean(scored))
    return summary


def _segment_volume(
    net: Any,
    adapter: Any,
    merged: Any,
    spec: Any,
    kind: str,
    path: Path,
    target: Path,
    name: str,
    window: str,
    axis: str,
    fg: Any,
    ref: Path | None,
    warnings: list[str],
    png: bool = False,
) -> dict[str, Any]:
    """Segment every slice of a NIfTI volume or DICOM series and write the mask in its geometry."""
    from common.families.segmentation.dicomio import write_dicom_seg
    from common.families.segmentation.readers import read_volume
    from common.families.segmentation.task import dice, predict
    from common.families.segmentation.volumes import (
        VolumeError,
        masks_to_volume,
        mostly_foreground,
        same_grid,
        volume_slices,
        write_nifti_mask,
    )

    try:
        vol = read_volume(path, "volume")
        vs = volume_slices(vol, None, fg, axis, window, "all", 0)
    except VolumeError as exc:
        raise SiteCommandError(str(exc)) from None
    preds = []
    for s in range(0, len(vs.images), VOLUME_BATCH):
        preds += predict(net, adapter, vs.images[s : s + VOLUME_BATCH], None, spec, merged=merged)
    mask = masks_to_volume(vol, axis, vs.indices, preds)
    if png:  # the slice masks as the model saw them (radiological view), <k>.png by slice index
        from PIL import Image

        sdir = target / _slice_dir(kind, path)
        sdir.mkdir(exist_ok=True)
        for k, m in zip(vs.indices, preds, strict=True):
            Image.fromarray(m.astype("uint8") * 255).save(sdir / f"{axis}-{k:04d}.png", format="PNG")
    suffix = ".nii.gz" if kind == "nifti" else ".dcm"
    tmp = target / f".{name}.tmp-{os.getpid()}{suffix}"
    if kind == "nifti":
        write_nifti_mask(vol, mask, tmp)
    else:
        write_dicom_seg(vol, mask, tmp)
    os.replace(tmp, target / name)
    row: dict[str, Any] = {
        "format": "nifti" if kind == "nifti" else "dicom-seg",
        "slices": len(vs.indices),
        "axis": axis,
        "window": window,
        "foreground": round(float(mask.mean()), 6),
    }
    if png:
        row["png"] = _slice_dir(kind, path)
    if ref is not None:
        try:
            label = read_volume(ref, "reference label map")
        except VolumeError as exc:
            raise SiteCommandError(str(exc)) from None
        why = same_grid(vol, label)
        if why:
            raise SiteCommandError(f"reference label map {ref} does not fit {path}: {why}")
        from common.families.segmentation.volumes import from_ras, to_ras

        truth_mask = from_ras(to_ras(fg(label.data), label.affine), vol.affine)
        row["dice"] = round(dice(mask.astype(bool), truth_mask), 6)
        row["reference_foreground"] = round(float(truth_mask.mean()), 6)
        warn = mostly_foreground(float(truth_mask.mean()), f"reference label map {ref}", fg)
        if warn:
            row["warning"] = warn
            warnings.append(warn)
    return row


def cmd_segment(args: argparse.Namespace) -> None:
    s = segment_files(
        args.adapter,
        args.images,
        args.out,
        model=args.model,
        prompt=args.prompt,
        truth=args.masks,
        progress=not args.quiet,
        mask_foreground=args.mask_foreground,
        window=args.window,
        axis=args.axis,
        force=args.force,
        png=args.png,
    )
    if args.json:
        print(json.dumps(s))
        return
    score = f"; mean DICE {s['dice']:.4f} against {args.masks}" if "dice" in s else ""
    print(f"wrote {s['n']} masks to {s['out']} (index: masks.jsonl) in {s['seconds']} s{score}")
    for w in s["warnings"]:
        print(f"warning: {w}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` to the ``rpe`` sub-commands."""
    sg = subparsers.add_parser(
        "segment",
        help="write masks for new images or volumes with the SAM base + a (received) segmentation adapter",
        description="Masks with θ0 + ΔW of a segmentation adapter (e.g. the composition the coordinator "
        "delivered to <site-dir>/adapters/<name>) and the box prompt the federation trains and scores with, "
        "each in its input's geometry: a 0/255 PNG per 2-D image, a NIfTI (same shape, affine, header) per "
        ".nii/.nii.gz volume, a DICOM-SEG referencing the source instances per DICOM series folder; "
        "masks.jsonl indexes them. Existing outputs are refused without --force. docs/DATA_IMAGES.md.",
    )
    sg.add_argument("--adapter", required=True, help="PEFT adapter directory of a segmentation adapter")
    sg.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="image files, NIfTI volumes, DICOM series folders, or folders of them",
    )
    sg.add_argument(
        "--out", required=True, help="directory for <stem>_mask.png / <stem>_mask.nii.gz / <series>_seg.dcm"
    )
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
    sg.add_argument(
        "--masks",
        help="directory of reference masks (same file names; <stem>.nii.gz label maps for volumes): DICE per input",
    )
    sg.add_argument(
        "--mask-foreground",
        default="nonzero",
        metavar="VALUES",
        help="which value(s) of a reference mask are the object: nonzero (default), 0 for masks stored "
        "inverted (0 = object), or label values such as 5 or 5,6; a reference mostly object is warned about",
    )
    sg.add_argument(
        "--window",
        default="auto",
        help="volumes: intensity window, auto (0.5-99.5 percentiles), a preset (ct-soft-tissue, ct-abdomen, "
        "ct-liver, ct-lung, ct-bone, ct-brain) or LEVEL,WIDTH; use the site's seg-window",
    )
    sg.add_argument(
        "--axis",
        default="axial",
        choices=["axial", "coronal", "sagittal"],
        help="volumes: the slices segmented (default axial; use the site's seg-axis)",
    )
    sg.add_argument(
        "--png",
        action="store_true",
        help="volumes: also write each slice's mask as a PNG, <out>/<stem>_slices/<axis>-<k>.png (as the model saw it)",
    )
    sg.add_argument("--force", action="store_true", help="overwrite this run's outputs where they exist in --out")
    sg.add_argument("--quiet", action="store_true", help="no progress lines")
    sg.add_argument("--json", action="store_true")
    sg.set_defaults(func=cmd_segment)
