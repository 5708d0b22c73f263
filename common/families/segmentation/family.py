"""The segmentation family behind the ``Family`` protocol: a SAM LoRA, the encoder's mean as z, DICE.

A site's data is one site of a multi-site set in the data root, named by its node config:
``seg-dataset`` (``prostate-multisite`` or ``fundus-multidomain[:disc|:cup]``), ``seg-site`` (e.g.
``RUNMC``) and ``seg-copies`` (augmented copies of each training slice; 1 by default); the data
root is ``data-path`` when it holds the set, else the shared one. ``seg-dataset = "volumes"`` is
a site's own NIfTI volumes or DICOM series with label maps under ``data-path`` (``volsite``; keys
``seg-mask-foreground``, ``seg-window``, ``seg-axis``, ``seg-slices``, ``seg-max-slices``,
``seg-test-fraction``; docs/DATA_IMAGES.md). One image is one example (and
one privacy unit); one held-out slice is one scored item. ``model-path`` is ``litemedsam`` or a
SAM-style checkpoint directory. DP-SGD is not implemented for this family (``supports_dp``).
Torch and the model code are imported inside the methods only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.families.base import (
    Base,
    DataCheck,
    DataCounts,
    DPSettings,
    FamilyError,
    RegistryBase,
    RegistrySpec,
    SiteDataset,
    SiteInputs,
    TrainPlan,
    TrainResult,
)
from common.families.segmentation.volsite import VOLUME_KEYS

#: what a request's ``lora_targets`` may name for this family; anything else (e.g. the report
#: default ``q_proj,v_proj``) means the family's default, the mask decoder
SEG_TARGETS = ("decoder", "last-stage", "neck")
#: the z representation (``common.families.segmentation.task.REPRESENTATION``, without its torch import)
REPRESENTATION = "sam-encoder-mean"
EMBEDDINGS_CACHE_DIR = "seg-embeddings"
#: ``seg-dataset`` of a site's own NIfTI / DICOM volumes (``volsite``; no import of nibabel here)
VOLUMES = "volumes"


def _volume_site(site: SiteInputs) -> Any:
    """A site's own volumes (``seg-dataset = "volumes"``, ``common.families.segmentation.volsite``)."""
    from common.families.segmentation.data import SegSite
    from common.families.segmentation.volsite import VolumeSettings, scan
    from common.families.segmentation.volumes import VolumeError

    try:
        found = scan(site.data_path, VolumeSettings.from_options(site.option))
    except VolumeError as exc:
        raise FamilyError(f"site {site.site!r}: {exc}") from None
    if found.check.problems:
        more = len(found.check.problems) - 1
        raise FamilyError(
            f"site {site.site!r}: {found.check.problems[0]}"
            + (f" (and {more} more problem{'s' if more > 1 else ''}; `rpe data check` lists them)" if more else "")
        )
    meta = {"unlabeled": found.unlabeled, "modality": found.modality.lower(), "check": found.check}
    return SegSite(
        site.site, VOLUMES, found.train_images, found.train_masks, found.test_images, found.test_masks, meta=meta
    )


def seg_site(site: SiteInputs) -> Any:
    """The site's slices (``common.families.segmentation.data.SegSite``) from its node config."""
    from common.families.segmentation.data import PROSTATE, ImageError, load_fundus_site, load_prostate_site

    dataset, name = site.option("seg-dataset", PROSTATE), site.option("seg-site")
    if dataset == VOLUMES:
        return _volume_site(site)
    if not name:
        raise FamilyError(f"site {site.site!r}: node config has task=segmentation but no 'seg-site'")
    base, _, structure = dataset.partition(":")
    root = site.data_path if (site.data_path / base).is_dir() else None
    try:
        if base == PROSTATE:
            return load_prostate_site(name, root)
        return load_fundus_site(name, structure or "disc", root)
    except KeyError as exc:
        raise FamilyError(f"site {site.site!r}: {exc.args[0]}") from None
    except ImageError as exc:  # a bomb, a FIFO, a mask of another size than its image: named, no traceback
        raise FamilyError(f"site {site.site!r}: {exc}") from None


def _split(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


class SegmentationFamily:
    """Segmentation with a frozen SAM-style model (``common.families.segmentation``)."""

    name = "segmentation"
    metric = "dice"
    metric_title = "DICE"
    registry = RegistrySpec(subdir="segmentation", representation=REPRESENTATION)
    unit = "image"
    node_config_keys: tuple[str, ...] = ("seg-dataset", "seg-site", "seg-copies", *VOLUME_KEYS)
    supports_dp = False
    default_model = "litemedsam"
    #: ``targets``: comma-separated ``SEG_TARGETS`` (else ``lora_targets`` names them, else the decoder)
    option_keys: dict[str, tuple[type, ...]] = {"targets": (str,)}
    commands = "common.families.segmentation.commands:register"
    demo = "common.families.segmentation.demo:demo_plan"

    def _task(self, site: SiteInputs, spec: Any = None) -> Any:
        from common.families.segmentation.task import SegmentationTask

        kwargs = {} if spec is None else {"spec": spec}
        return SegmentationTask(
            augment_copies=int(site.option("seg-copies", "1")),
            cache=site.work_dir / EMBEDDINGS_CACHE_DIR,
            **kwargs,
        )

    # -- data ------------------------------------------------------------------------------------
    def counts(self, site: SiteInputs) -> DataCounts:
        if site.option("seg-dataset") == VOLUMES:  # kept per folder state: whoami must stay cheap
            from common.families.segmentation.volsite import VolumeSettings, cached_counts

            try:
                used = cached_counts(site.data_path, VolumeSettings.from_options(site.option), site.work_dir)
            except ValueError:
                used = None
            if used is None:
                return DataCounts([], 0, 0, 0, 0, False)
            n_train, n_test, n_unlab = used["train"], used["eval"], used["unlabeled"]
            return DataCounts([f"{VOLUMES}-{site.site}"], n_train + n_test + n_unlab, n_train, n_unlab, n_test, True)
        try:
            s, ok = seg_site(site), True
            n_train, n_test = len(s.train_images), len(s.test_images)
            n_unlab = len(s.meta.get("unlabeled", []))
            groups = [f"{s.dataset}-{s.name}"]
        except (OSError, FamilyError, ValueError):
            n_train = n_test = n_unlab = 0
            ok, groups = False, []
        return DataCounts(groups, n_train + n_test + n_unlab, n_train, n_unlab, n_test, ok)

    def load_data(self, site: SiteInputs) -> SiteDataset:
        s = seg_site(site)
        train = list(zip(s.train_images, s.train_masks, strict=True))
        held = list(zip(s.test_images, s.test_masks, strict=True))
        return SiteDataset(train, held, list(s.meta.get("unlabeled", [])), [f"{s.dataset}-{s.name}"], source=s)

    def examples_from(self, path: Path) -> list[Any]:
        """Every image in a folder (or one image file): grey or RGB, as a site's slices; a volume (or
        a folder of volumes: NIfTI files, DICOM series) gives all its axial slices, window ``auto``."""
        from common.families.segmentation.data import read_images
        from common.families.segmentation.readers import is_volume, read_volume
        from common.families.segmentation.volumes import Foreground, volume_slices

        p = Path(path)
        try:
            vols = [p] if is_volume(p) else sorted(q for q in p.iterdir() if is_volume(q)) if p.is_dir() else []
            if vols:
                return [im for v in vols for im in volume_slices(read_volume(v), None, Foreground()).images]
            return read_images(path)
        except ValueError as exc:
            raise FamilyError(str(exc)) from None

    def check_data(self, site: SiteInputs) -> DataCheck:
        """What ``rpe data check`` prints for a segmentation site: the files and slices each split
        would use, the label convention, problems (unreadable files, geometry that does not fit,
        no object) and warnings (a mask that is mostly object). No model, no torch."""
        from common.families.segmentation.data import FUNDUS_THRESHOLDS, PROSTATE
        from common.families.segmentation.volsite import VolumeSettings, scan
        from common.families.segmentation.volumes import MOSTLY_FOREGROUND, VolumeError

        dataset = site.option("seg-dataset", PROSTATE)
        if dataset == VOLUMES:
            try:
                return scan(site.data_path, VolumeSettings.from_options(site.option)).check
            except VolumeError as exc:
                return DataCheck(self.name, str(site.data_path), problems=[str(exc)])
        check = DataCheck(self.name, str(site.data_path))
        try:
            s = seg_site(site)
        except (FamilyError, OSError, ValueError) as exc:
            check.problems.append(str(exc))
            return check
        base, _, structure = dataset.partition(":")
        if base == PROSTATE:
            check.lines.append(f"{PROSTATE} site {s.name}: masks on disk are 0 = prostate, 255 = background (read so)")
        else:
            limit = FUNDUS_THRESHOLDS[structure or "disc"]
            check.lines.append(f"{s.dataset} site {s.name}: object = mask value < {limit} ({structure or 'disc'})")
        check.lines.append(f"{len(s.train_images)} train slices, {len(s.test_images)} eval slices")
        for split, masks in (("train", s.train_masks), ("test", s.test_masks)):
            for i, m in enumerate(masks):
                frac = float(np.mean(m))
                if frac > MOSTLY_FOREGROUND:
                    check.warnings.append(f"{split} mask {i}: {100 * frac:.1f} % object; is the convention inverted?")
        check.used = {"train": len(s.train_images), "eval": len(s.test_images), "unlabeled": 0}
        return check

    def z_examples(self, data: SiteDataset, enrolment: bool) -> list[Any]:
        # every image, at enrolment too; no mask is read (labelled items are (image, mask), unlabelled ones images)
        return [x[0] if isinstance(x, tuple) else x for x in data.all]

    def data_digest(self, examples: Sequence[Any]) -> str:
        # the family's name, then each image's sha256 (hex), each hashed in turn: the same digest a
        # site's released-z cache was keyed by before families had folders, so a site keeps finding it
        h = hashlib.sha256()
        for part in (self.name, *(hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in examples)):
            h.update(hashlib.sha256(part.encode()).digest())
        return h.hexdigest()

    def describe(self, data: SiteDataset) -> dict[str, str]:
        s = data.source
        if s.dataset == VOLUMES:
            return {"modality": s.meta.get("modality") or "image", "group": f"{s.dataset}-{s.name}"}
        return {"modality": "mr" if "prostate" in s.dataset else "fundus", "group": f"{s.dataset}-{s.name}"}

    # -- model -----------------------------------------------------------------------------------
    def z_states(self, site: SiteInputs) -> int:
        return 1  # z is the frozen encoder's output; no other layer

    def base_fingerprint(self, site: SiteInputs) -> str:
        from common.families.segmentation import sam

        return sam.fingerprint(site.model_path)

    def peft_base(self, site: SiteInputs) -> str:
        return str(site.model_path)

    def load_base(self, site: SiteInputs) -> Base:
        from common.families.segmentation import sam

        model = sam.load_sam(site.model_path)
        return Base(model, sam.model_fingerprint(model))

    def to_compute(self, base: Base, dtype: str) -> str:
        return "float32"  # trained and scored in float32 whatever the site's compute dtype

    def registry_base(self, model: str) -> RegistryBase:
        from common.families.segmentation import sam
        from common.models import linear_module_shapes

        sam_model = sam.load_sam(model)
        return RegistryBase(
            sam.model_fingerprint(sam_model),
            linear_module_shapes(sam_model),
            int(sam_model.rpe_config["embed_dim"]),  # type: ignore[index]  # set by sam.build_sam
            str(model),
        )

    # -- training --------------------------------------------------------------------------------
    def train_plan(self, config: Mapping[str, Any], dp: DPSettings | None) -> TrainPlan:
        from common.families.segmentation.task import SegLoraSpec

        chosen = (config.get("options") or {}).get("targets")
        if chosen is not None:
            targets = tuple(_split(chosen))
            bad = [t for t in targets if t not in SEG_TARGETS]
            if bad or not targets:
                raise FamilyError(f"option targets={chosen!r}: name one or more of {', '.join(SEG_TARGETS)}")
        else:
            targets = tuple(t for t in _split(config.get("lora_targets", "")) if t in SEG_TARGETS) or ("decoder",)
        spec = SegLoraSpec(
            rank=int(config.get("lora_r", 4)),
            alpha=float(config.get("lora_alpha", 8.0)),
            targets=targets,
            batch_size=int(config.get("batch_size", 2)),
        )
        return TrainPlan(
            steps=int(config.get("steps", 30)),
            lr=float(config.get("lr", 2e-3)),
            batch_size=spec.batch_size,
            seed=int(config.get("seed", 0)),
            dp=dp,
            options=spec,
        )

    def train(self, base: Base, site: SiteInputs, data: SiteDataset, plan: TrainPlan) -> TrainResult:
        if plan.dp is not None:
            raise FamilyError(
                "DP-SGD is not implemented for the segmentation family; this site's policy asks for it, "
                "so it does not train (remove dp-noise-multiplier or use the report family)"
            )
        task = self._task(site, plan.options)
        adapter, stats = task.train_adapter(base.model, data.source, steps=plan.steps, lr=plan.lr, seed=plan.seed)
        out = {
            "steps": plan.steps,
            "lr": plan.lr,
            "batch_size": plan.batch_size,
            "max_length": 0,
            "seed": plan.seed,
            "loss_first": stats.get("loss_first"),
            "loss_last": stats.get("loss_last"),
            "seconds": round(float(stats.get("seconds", 0.0)), 3),
            "n_train": int(stats["n_train"]),
        }
        print(
            f"[{site.site}] segmentation LoRA: {plan.steps} steps on {stats['n_train']} slices "
            f"in {stats['seconds']:.1f} s",
            flush=True,
        )
        return TrainResult(adapter, out)

    # -- z ---------------------------------------------------------------------------------------
    def embed(self, base: Base, site: SiteInputs, examples: Sequence[Any], layer: int, clip_norm: float | None) -> Any:
        return self._task(site).site_embedding(base.model, list(examples), clip_norm, site.site)

    # -- scores ----------------------------------------------------------------------------------
    def score(
        self, base: Base, site: SiteInputs, examples: Sequence[Any], adapters: Sequence[Any]
    ) -> list[dict[str, float]]:
        from common.families.segmentation.task import evaluate

        task = self._task(site)
        images, masks = [im for im, _ in examples], [m for _, m in examples]
        name = site.option("seg-site") or site.site
        out = []
        for adapter in adapters:
            res = evaluate(base.model, adapter, images, masks, task.spec.prompt, name, task.cache)
            out.append({"dice": float(res["dice"]), "n": float(res["n"]), "outputs": res["outputs"]})
        return out


FAMILY = SegmentationFamily()
