"""Evaluate a base model with (or without) an adapter on a site's held-out examples.

Experiments evaluate many composed adapters against one shared base model, so wrapping the model
with PEFT for each of them would be wasteful. ``applied_delta`` instead adds ``weight * scale *
B @ A`` into the matching ``nn.Linear`` weights in place and puts the saved original tensors back
afterwards - bit-exactly, also when the body raises - so the next arm starts from the same base.
For a single adapter this is the same function as PEFT's merged model (up to float rounding).

``generate`` is greedy, batched with left padding (so every row's next token sits in the last
column), runs under ``torch.inference_mode`` and stops each row at the end-of-sequence token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from common.data import Example
from common.tasks import Task, rouge_l

if TYPE_CHECKING:
    from common.lora import LoraAdapter

__all__ = ["applied_delta", "evaluate_task", "generate", "rouge_l"]


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
) -> list[str]:
    """Greedy completions of already formatted prompts (e.g. ``task.build_prompt``), in order.

    Prompts are tokenized without adding special tokens (the chat template already has them),
    grouped by length so a batch carries little padding, and decoded without special tokens.
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _progress(len(prompts), "generate", progress) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(encoded[i])
                    ids[row, width - n :] = torch.tensor(encoded[i])
                    mask[row, width - n :] = 1
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                    num_beams=1, eos_token_id=eos, pad_token_id=pad_id, temperature=None, top_p=None,
                    top_k=None,
                )
                for row, i in enumerate(batch):
                    new = out[row, width:].tolist()
                    if eos in new:
                        new = new[: new.index(eos)]
                    outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return outputs


def _delta(module: Any) -> torch.Tensor:
    """``scale * B @ A`` of a ``common.lora.LoraModule``."""
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
        target = modules.get(name)
        if target is None:
            sample = ", ".join(n for n, m in modules.items() if isinstance(m, torch.nn.Linear))[:200]
            raise KeyError(f"adapter module {name!r} is not a module of this model "
                           f"(linear modules: {sample}...)")
        if not isinstance(target, torch.nn.Linear):
            raise TypeError(f"adapter module {name!r} is a {type(target).__name__}, not an nn.Linear")
        delta = _delta(lora)
        if tuple(delta.shape) != tuple(target.weight.shape):
            raise ValueError(f"adapter module {name!r}: ΔW has shape {tuple(delta.shape)}, the model's "
                             f"weight {tuple(target.weight.shape)}; was it trained on another base model?")
        plan.append((target, delta))
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
    labeled = [ex for ex in examples if ex.target is not None]
    if not labeled:
        raise ValueError(f"no labeled examples to evaluate ({len(examples)} given, none with a target)")
    prompts = [task.build_prompt(ex, tokenizer) for ex in labeled]
    start = time.perf_counter()
    with applied_delta(model, adapter, weight):
        predictions = generate(model, tokenizer, prompts, max_new_tokens or task.max_new_tokens,
                               batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    references = [ex.target for ex in labeled]
    scores = task.score(predictions, references)
    return {**scores, "n": len(labeled), "seconds": seconds, "predictions": predictions,
            "references": references, "uids": [ex.uid for ex in labeled]}
