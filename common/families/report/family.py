"""The report family behind the ``Family`` protocol: a causal LM, findings in, impression out, ROUGE-L.

A site's data is a JSONL or CSV file (labeled lines train, unlabeled lines are unlabeled) or a
directory with ``train`` / ``eval`` / ``unlabeled`` files (``common.families.report.sitedata``); z
is the mean-pooled hidden state of one layer over the findings text (``common.embedding.mean_embedding``), each report's token sum
kept in ``<site-dir>/embedding-cache/`` so an evaluation's embedding query does not recompute the
reports the site enrolled with. Torch and transformers are imported inside the methods only.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from common.families.report.data import DatasetFormatError, Example

TRAIN_FILE, EVAL_FILE, UNLABELED_FILE = "train.jsonl", "eval.jsonl", "unlabeled.jsonl"
#: where a site keeps each report's token sum under its base model (``mean_embedding``'s cache):
#: derived from the private reports, so it stays in the site directory like they do
EMBEDDING_CACHE_DIR = "embedding-cache"


def load_site_examples(path: Path, columns: Any = None, default_group: str | None = None) -> SiteDataset:
    """A JSONL or CSV file (labeled rows train, unlabeled rows are unlabeled) or a folder of split
    files (``common.families.report.sitedata``; ``columns``: the CSV column mapping)."""
    from common.families.report.sitedata import load_site_examples as load

    return load(path, columns, default_group)


def _task() -> Any:
    from common.families.report.task import TextReportTask

    return TextReportTask()


class ReportFamily:
    """Radiology reports on a causal LM (``common.families.report``)."""

    name = "report-text"
    metric = "rouge_l"
    metric_title = "ROUGE-L F1"
    registry = RegistrySpec(subdir="", representation="hidden-mean")
    unit = "report"
    #: a CSV export's column mapping and the group of a file without a group column (``sitedata``)
    node_config_keys: tuple[str, ...] = ("report-columns", "report-group")
    supports_dp = True
    default_model = "smollm2-135m-instruct"
    option_keys: dict[str, tuple[type, ...]] = {}
    commands = "common.families.report.commands:register"
    demo = "common.families.report.demo:demo_plan"

    def task(self) -> Any:
        """The ``TextReportTask`` (prompts, training features, embedding texts, ROUGE-L)."""
        return _task()

    # -- data ------------------------------------------------------------------------------------
    def counts(self, site: SiteInputs) -> DataCounts:
        try:
            data, ok = self.load_data(site), True
        except (OSError, DatasetFormatError, FamilyError):
            data, ok = SiteDataset([], [], []), False
        return DataCounts(data.groups[:8], len(data.all), len(data.train), len(data.unlabeled), len(data.eval), ok)

    def load_data(self, site: SiteInputs) -> SiteDataset:
        return load_site_examples(site.data_path, site.option("report-columns"), site.option("report-group") or None)

    def check_data(self, site: SiteInputs) -> DataCheck:
        """What ``rpe data check`` says about the site's reports (``common.families.report.check``)."""
        from common.families.report.check import check_reports

        return check_reports(site)

    def examples_from(self, path: Path) -> list[Any]:
        """A JSONL file or a site's data directory; every report as unlabeled findings."""
        return self.z_examples(load_site_examples(path), enrolment=False)

    def z_examples(self, data: SiteDataset, enrolment: bool) -> list[Any]:
        # at enrolment z is pooled over the reports the adapter is trained on; a query's z over every
        # report, as unlabeled findings (whatever labels the site may hold)
        if enrolment:
            return list(data.train)
        return [Example(e.prompt, None, e.group, e.uid) for e in data.all]

    def data_digest(self, examples: Sequence[Any]) -> str:
        h = hashlib.sha256()
        for text in _task().embedding_texts(examples):
            h.update(hashlib.sha256(text.encode()).digest())
        return h.hexdigest()

    def describe(self, data: SiteDataset) -> dict[str, str]:
        group = Counter(e.group for e in data.train).most_common(1)[0][0]
        return {"modality": group.split("-", 1)[0], "group": group}

    # -- model -----------------------------------------------------------------------------------
    def z_states(self, site: SiteInputs) -> int:
        from common.models import resolve_model_dir

        try:
            cfg = json.loads((Path(resolve_model_dir(site.model_path)) / "config.json").read_text())
            return int(cfg.get("num_hidden_layers") or cfg["text_config"]["num_hidden_layers"]) + 1
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FamilyError(f"cannot read the layer count of base model {site.model_path}: {exc}") from None

    def base_fingerprint(self, site: SiteInputs) -> str:
        from common.models import fingerprint

        return fingerprint(site.model_path)

    def peft_base(self, site: SiteInputs) -> str:
        from common.models import resolve_model_dir

        return str(resolve_model_dir(site.model_path))

    def load_base(self, site: SiteInputs) -> Base:
        from common.models import fingerprint, load_base_model

        model, tok = load_base_model(site.model_path)
        return Base(model, fingerprint(site.model_path), tok)

    def to_compute(self, base: Base, dtype: str) -> str:
        from common.models import cast_parameters, compute_dtype, model_device

        torch_dtype = compute_dtype(dtype, model_device(base.model))
        cast_parameters(base.model, torch_dtype)
        return str(torch_dtype).removeprefix("torch.")

    def registry_base(self, model: str) -> RegistryBase:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from common.models import fingerprint, linear_module_shapes, resolve_model_dir

        model_dir = resolve_model_dir(model)
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):  # shapes without loading the weights
            shapes = linear_module_shapes(AutoModelForCausalLM.from_config(config))
        return RegistryBase(fingerprint(model_dir), shapes, int(config.hidden_size), str(model_dir))

    # -- training --------------------------------------------------------------------------------
    def train_plan(self, config: Mapping[str, Any], dp: DPSettings | None) -> TrainPlan:
        from common.families.report.training import LoraSpec

        spec = LoraSpec(
            r=int(config.get("lora_r", 8)),
            alpha=float(config.get("lora_alpha", 16.0)),
            target_modules=tuple(_split(config.get("lora_targets", "q_proj,v_proj"))),
            dropout=float(config.get("lora_dropout", 0.0)),
        )
        return TrainPlan(
            steps=int(config.get("steps", 40)),
            lr=float(config.get("lr", 1e-3)),
            batch_size=int(config.get("batch_size", 4)),
            seed=int(config.get("seed", 0)),
            dp=dp,
            options={"spec": spec, "max_length": int(config.get("max_length", 192))},
        )

    def train(self, base: Base, site: SiteInputs, data: SiteDataset, plan: TrainPlan) -> TrainResult:
        from common.families.report.training import DPConfig, train_lora

        dp = plan.dp
        max_length = plan.options["max_length"]
        adapter, stats = train_lora(
            base.model,
            base.extra,
            data.train,
            _task(),
            plan.options["spec"],
            steps=plan.steps,
            lr=plan.lr,
            batch_size=plan.batch_size,
            max_length=max_length,
            seed=plan.seed,
            progress=True,
            dp=None if dp is None else DPConfig(dp.noise_multiplier, dp.max_grad_norm, dp.delta),
            base_model=base.fingerprint,
        )
        out = {
            "steps": stats.get("steps", plan.steps),
            "lr": plan.lr,
            "batch_size": plan.batch_size,
            "max_length": max_length,
            "seed": plan.seed,
            "loss_first": stats.get("first_loss"),
            "loss_last": stats.get("final_loss"),
            "seconds": round(float(stats.get("seconds", 0.0)), 3),
            "n_train": len(data.train),
        }
        return TrainResult(adapter, out, stats if dp is not None else None)

    # -- z ---------------------------------------------------------------------------------------
    def embed(self, base: Base, site: SiteInputs, examples: Sequence[Any], layer: int, clip_norm: float | None) -> Any:
        """Each report's float64 token sum is kept in ``<site-dir>/embedding-cache/`` (keyed by the
        base fingerprint) and not computed again."""
        from common.embedding import ExampleSumsCache, mean_embedding

        name = hashlib.sha256(f"{base.fingerprint}|{site.model_path}".encode()).hexdigest()[:32]
        cache = ExampleSumsCache(site.work_dir / EMBEDDING_CACHE_DIR / f"{name}.npz")
        texts = _task().embedding_texts(examples)
        emb = mean_embedding(
            base.model,
            base.extra,
            texts,
            layer=layer,
            clip_norm=clip_norm,
            cache=cache,
            cache_tag=base.fingerprint,
            return_sums=True,
        )
        try:
            cache.save()
        except OSError as exc:  # a full disk costs the next query time, not this reply
            print(f"[{site.site}] could not keep the report embeddings cache ({exc})", flush=True)
        return emb

    # -- scores ----------------------------------------------------------------------------------
    def score(
        self, base: Base, site: SiteInputs, examples: Sequence[Any], adapters: Sequence[Any]
    ) -> list[dict[str, float]]:
        """ROUGE-L of each adapter; several are generated together (the weights are read once per
        decoding step for all of them: ``evaluate_task_arms``)."""
        from common.families.report.evaluation import evaluate_task, evaluate_task_arms

        if len(adapters) == 1:
            return [evaluate_task(base.model, base.extra, _task(), list(examples), adapter=adapters[0])]
        return list(evaluate_task_arms(base.model, base.extra, _task(), list(examples), list(adapters)))


def _split(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


FAMILY = ReportFamily()
