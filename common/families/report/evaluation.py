"""Evaluate a base model with (or without) an adapter on a site's held-out examples.

Experiments evaluate many composed adapters against one shared base model, so wrapping the model
with PEFT for each of them would be wasteful. ``applied_delta`` instead adds ``weight * scale *
B @ A`` into the matching ``nn.Linear`` weights in place and puts the saved original tensors back
afterwards - bit-exactly, also when the body raises - so the next arm starts from the same base.
For a single adapter this is the same function as PEFT's merged model (up to float rounding).

``generate`` is greedy, batched with left padding (so every row's next token sits in the last
column), runs under ``torch.inference_mode`` and stops each row at the end-of-sequence token.

``evaluate_task_arms`` scores many adapters ("arms") on the same examples in one pass: every
(arm, prompt) pair is a row, the rows of one prompt share a batch (same length, so no padding),
and forward hooks add each row's own low-rank update ``scale · (x Aᵀ) Bᵀ`` to the base linear
outputs — PEFT's unmerged LoRA forward, per row. On a CPU, decoding a small model is bound by
reading its weights once per step; one batch of several arms reads them once for all of them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from common.families.report.data import Example
from common.families.report.task import Task, rouge_l
from common.models import model_device

if TYPE_CHECKING:
    from common.adapters import LoraAdapter

__all__ = ["applied_delta", "evaluate_task", "evaluate_task_arms", "generate", "generate_arms", "rouge_l"]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, file=sys.stderr, leave=False)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
    *,
    arms: Sequence[int] | None = None,
    on_batch: Callable[[list[int]], Any] | None = None,
) -> list[str]:
    """Greedy completions of already formatted prompts (e.g. ``task.build_prompt``), in order.

    Prompts are tokenized without adding special tokens (the chat template already has them),
    grouped by length so a batch carries little padding, and decoded without special tokens.
    ``arms`` (one label per prompt) orders a batch's rows by arm, and ``on_batch`` is told each
    batch's row labels before it runs (how ``evaluate_task_arms`` routes rows to adapters).
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    label = list(arms) if arms is not None else [0] * len(prompts)
    if arms is None:
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    else:  # equal prompts side by side, so one prompt's arms share a batch
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), encoded[i], i))
    outputs: list[str] = [""] * len(prompts)
    dev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _progress(len(prompts), "generate", progress) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                if arms is not None:
                    batch = sorted(batch, key=lambda i: (label[i], i))
                if on_batch is not None:
                    on_batch([label[i] for i in batch])
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(encoded[i])
                    ids[row, width - n :] = torch.tensor(encoded[i])
                    mask[row, width - n :] = 1
                out = model.generate(
                    input_ids=ids.to(dev),
                    attention_mask=mask.to(dev),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=eos,
                    pad_token_id=pad_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                ).cpu()
                for row, i in enumerate(batch):
                    new = out[row, width:].tolist()
                    if eos in new:
                        new = new[: new.index(eos)]
                    outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return outputs


def _adapted_linear(
    modules: dict[str, torch.nn.Module], name: str, shape: tuple[int, ...], where: str = ""
) -> torch.nn.Linear:
    """The model's ``nn.Linear`` an adapter module ``name`` with update shape ``shape`` (out, in)
    applies to; a missing module, another module type or another shape is an error that says so
    (``where`` prefixes the message, e.g. which arm)."""
    target = modules.get(name)
    if target is None:
        sample = ", ".join(n for n, m in modules.items() if isinstance(m, torch.nn.Linear))[:200]
        raise KeyError(f"{where}adapter module {name!r} is not a module of this model (linear modules: {sample}...)")
    if not isinstance(target, torch.nn.Linear):
        raise TypeError(f"{where}adapter module {name!r} is a {type(target).__name__}, not an nn.Linear")
    if tuple(shape) != tuple(target.weight.shape):
        raise ValueError(
            f"{where}adapter module {name!r}: ΔW has shape {tuple(shape)}, the model's "
            f"weight {tuple(target.weight.shape)}; was it trained on another base model?"
        )
    return target


def _delta(module: Any) -> torch.Tensor:
    """``scale * B @ A`` of a ``common.adapters.lora.LoraModule``."""
    if hasattr(module, "delta"):
        return module.delta()
    return float(module.scale) * (module.B @ module.A)


@contextmanager
def applied_delta(model: torch.nn.Module, adapter: LoraAdapter | None, weight: float = 1.0) -> Iterator[Any]:
    """Temporarily add ``weight * ΔW`` of every adapter module into the base model's weights.

    Every module is checked (exists, is an ``nn.Linear``, shape matches) before any weight is
    touched, so a mismatched adapter leaves the model as it was. Originals of the touched weights
    are cloned and copied back on exit, also on exception. ``adapter=None`` or ``weight=0`` is a
    no-op (the base model), which keeps the caller's code uniform across arms.
    """
    if adapter is None or weight == 0:
        yield model
        return
    modules = dict(model.named_modules())
    plan: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    for name, lora in adapter.modules.items():
        delta = _delta(lora)
        plan.append((_adapted_linear(modules, name, tuple(delta.shape)), delta))
    saved = [(target, target.weight.detach().clone()) for target, _ in plan]
    try:
        with torch.no_grad():
            for target, delta in plan:
                w = target.weight
                if w.dtype == torch.float32:
                    w.add_(delta.to(device=w.device), alpha=float(weight))
                else:  # bf16/fp16 base: add in float32 and round once, not delta then sum
                    w.copy_(w.float().add_(delta.to(device=w.device), alpha=float(weight)).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for target, original in saved:
                target.weight.copy_(original)


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    adapter: LoraAdapter | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    weight: float = 1.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate for every labeled example (with ``adapter`` applied, if any) and score it.

    Returns ``{"rouge_l", "n", "seconds", "predictions", "references", "uids"}``, plus any other
    metric the task's ``score`` reports.
    """
    labeled = _labeled(examples)
    prompts = [task.build_prompt(ex, tokenizer) for ex in labeled]
    start = time.perf_counter()
    with applied_delta(model, adapter, weight):
        predictions = generate(
            model, tokenizer, prompts, max_new_tokens or task.max_new_tokens, batch_size=batch_size, progress=progress
        )
    return _scored(task, labeled, predictions, time.perf_counter() - start)


def _labeled(examples: Sequence[Example]) -> list[Example]:
    labeled = [ex for ex in examples if ex.target is not None]
    if not labeled:
        raise ValueError(f"no labeled examples to evaluate ({len(examples)} given, none with a target)")
    return labeled


def _scored(task: Task, labeled: Sequence[Example], predictions: list[str], seconds: float) -> dict[str, Any]:
    references = [ex.target for ex in labeled]
    return {
        **task.score(predictions, references),
        "n": len(labeled),
        "seconds": seconds,
        "predictions": predictions,
        "references": references,
        "uids": [ex.uid for ex in labeled],
    }


class _RowAdapters:
    """Forward hooks on the adapted ``nn.Linear`` modules adding, for each row of the batch, the
    update of that row's arm (rows of one arm are contiguous: ``generate`` orders them so)."""

    def __init__(self, model: torch.nn.Module, adapters: Sequence[LoraAdapter | None]) -> None:
        modules = dict(model.named_modules())
        self.per_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for arm, adapter in enumerate(adapters):
            for name, lora in adapter.modules.items() if adapter is not None else ():
                A, B = lora.A, lora.B
                target = _adapted_linear(modules, name, (B.shape[0], A.shape[1]), f"arm {arm}: ")
                dt, dev = target.weight.dtype, target.weight.device
                self.per_module.setdefault(name, []).append(
                    (
                        arm,
                        A.to(device=dev, dtype=dt).t().contiguous(),
                        B.to(device=dev, dtype=dt).t().contiguous(),
                        float(lora.scale),
                    )
                )
        self.ranges: dict[int, slice] = {}
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.per_module]

    def set_batch(self, arms: list[int]) -> None:
        ranges: dict[int, slice] = {}
        for row, arm in enumerate(arms):
            r = ranges.get(arm)
            if r is not None and r.stop != row:
                raise AssertionError("rows of one arm must be contiguous in a batch")
            ranges[arm] = slice(r.start if r is not None else row, row + 1)
        self.ranges = ranges

    def _hook(self, name: str) -> Callable[..., torch.Tensor]:
        factors = self.per_module[name]

        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            for arm, At, Bt, scale in factors:
                rows = self.ranges.get(arm)
                if rows is not None:
                    out[rows] += torch.matmul(torch.matmul(x[rows], At), Bt).mul_(scale)
            return out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def evaluate_task_arms(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    adapters: Sequence[LoraAdapter | None],
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``evaluate_task`` for every adapter of ``adapters`` (``None``: the base model), generated
    together: one result dict per arm, in order. Each adapter is checked against the model before
    anything runs; the model's weights are never modified."""
    labeled = _labeled(examples)
    if not adapters:
        return []
    prompts = [task.build_prompt(ex, tokenizer) for ex in labeled]
    start = time.perf_counter()
    per_arm = generate_arms(
        model,
        tokenizer,
        prompts,
        adapters,
        max_new_tokens or task.max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    seconds = (time.perf_counter() - start) / len(adapters)
    return [_scored(task, labeled, preds, seconds) for preds in per_arm]


def generate_arms(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    adapters: Sequence[LoraAdapter | None],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[str]]:
    """``generate`` of ``prompts`` under each adapter of ``adapters`` (``None``: the base model),
    all in one pass with per-row updates; one list of completions per adapter, in order."""
    if not adapters:
        return []
    hooks = _RowAdapters(model, adapters)
    try:
        flat = generate(
            model,
            tokenizer,
            [p for _ in adapters for p in prompts],
            max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            arms=[a for a in range(len(adapters)) for _ in prompts],
            on_batch=hooks.set_batch,
        )
    finally:
        hooks.remove()
    n = len(prompts)
    return [flat[a * n : (a + 1) * n] for a in range(len(adapters))]
