"""Train one LoRA adapter on a site's labeled examples, leaving the shared base model untouched.

The base model is loaded once per process and shared by training, embedding and evaluation, so
``train_lora`` injects PEFT LoRA layers into it, trains only those, copies the learned A/B matrices
out as a ``common.adapters.lora.LoraAdapter`` and then *unloads* the LoRA layers again (in a ``finally``),
restoring the original modules, their ``requires_grad`` flags and the train/eval mode.

The loop is a plain torch loop, kept small on purpose (two CPU cores):

* the loss is the mean cross-entropy over target tokens only (labels = -100 on the prompt), and
  the LM head (a 49k-vocabulary projection) is applied only at the positions that carry a label -
  on report data that is ~10% of the positions, which saves a large share of the compute;
* batches are length-bucketed (shuffle, sort within chunks, shuffle the batches), so right padding
  wastes little, and padding never changes the real tokens' states under causal attention;
* everything random (LoRA init, batch order) comes from ``seed`` inside a forked RNG, so the same
  seed gives the same adapter and the caller's RNG state is not disturbed. DP-SGD's noise and
  Poisson sampling are the exception: they come from OS entropy (``secrets``), because the seed is
  sent with the adapter and a known seed would let the coordinator subtract the noise. Only
  ``DPConfig(reproducible=True)`` (tests, benchmarks) draws them from ``seed``.

Optional DP-SGD (``dp=DPConfig(...)``): Poisson-sampled batches (each example joins a step with
probability batch_size / n), per-example gradients clipped to ``max_grad_norm``, Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm`` added to the sum, divided by the
expected batch size; the (epsilon, delta) spent is accounted with Opacus' RDP accountant and
returned in the stats.
"""

from __future__ import annotations

import math
import random
import secrets
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from common.families.report.data import Example
from common.families.report.task import IGNORE_INDEX, Task, TextReportTask
from common.models import model_device

if TYPE_CHECKING:
    from common.adapters import LoraAdapter

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters; ``alpha / r`` is the scale applied to ``B @ A``."""

    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.r)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD parameters: per-example clipping norm, noise multiplier and the target delta."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    #: draw noise and sampling from ``seed`` instead of OS entropy: NOT private, for tests only
    reproducible: bool = False


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random, chunk_batches: int = 16) -> list[list[int]]:
    """One epoch of length-bucketed batches: random chunks, sorted by length inside each chunk."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(features: Sequence[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``{input_ids, labels}`` features into (ids, labels with -100 on padding, attention mask)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return ids, labels, mask


def causal_lm_target_loss(
    model: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled positions, computing logits only there.

    Returns (loss, number of target tokens). Equal to transformers' own causal-LM loss, without
    projecting the prompt positions onto the vocabulary.
    """
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    select = shifted != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][select]).float()
    loss = torch.nn.functional.cross_entropy(logits, shifted[select])
    return loss, int(select.sum())


@contextmanager
def training_attention(model: Any, device: torch.device) -> Iterator[None]:
    """Eager attention while training on a CPU, the model's own implementation again afterwards.

    Why: PyTorch's CPU flash-attention *backward* (what ``sdpa`` runs in training) was a third of
    a SmolLM2 LoRA step here; the eager softmax(QKᵀ)V is plainly faster at report lengths (bf16,
    8 steps of 4 x 160 tokens, one thread: 7.3 -> 5.5 s; 8 x 256 tokens: 8.1 -> 5.7 s; float32
    about equal) with the same loss. Generation and z keep ``sdpa`` (no difference measured)."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = device.type == "cpu" and current == "sdpa" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def train_lora(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task: Task | None = None,
    spec: LoraSpec | None = None,
    steps: int = 40,
    lr: float = 1e-3,
    batch_size: int = 4,
    max_length: int = 192,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    warmup_steps: int | None = None,
    dp: DPConfig | None = None,
    base_model: str | None = None,
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Fine-tune a LoRA on ``examples`` for ``steps`` optimizer steps; return (adapter, stats).

    ``task`` (default ``TextReportTask()``) turns examples into tokens with the loss on the
    target only. The base model may be float32 or bfloat16 (PEFT keeps the LoRA factors in
    float32 either way; bf16 trains about twice as fast on CPUs with AVX512-BF16).

    Learning rate: linear warm-up over ``warmup_steps`` (default 10% of the steps), then linear
    decay to zero, so a short run neither starts with a jolt nor ends on a noisy step. Gradients
    are clipped to ``max_grad_norm`` (without DP; with DP the per-example clip replaces it).

    stats: steps, epochs, tokens_seen (all non-padding tokens through the model), target_tokens,
    seconds, tokens_per_s, final_loss (mean of the last 5 steps), mean_loss, first_loss, losses
    (one per step), lora (the spec) and, with DP, epsilon/delta/noise_multiplier/max_grad_norm.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from common.adapters import LoraAdapter, LoraModule

    spec = spec or LoraSpec()
    task = task or TextReportTask()
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a LoraSpec, got {type(spec).__name__} (is the task argument missing?)")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    labeled = [ex for ex in examples if ex.target is not None]
    if not labeled:
        raise ValueError(
            f"no labeled examples to train on ({len(examples)} given, all without target); a site "
            "without reports can still be embedded and receive a composed adapter, but not train one"
        )
    features = task.training_features(tokenizer, labeled, max_length)
    lengths = [len(f["input_ids"]) for f in features]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    dev = model_device(model)
    was_training = model.training
    if hasattr(model, "peft_config"):
        raise ValueError("the model already carries PEFT adapters; pass the plain base model")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=spec.dropout,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), training_attention(model, dev):
        torch.manual_seed(seed)
        rng = random.Random(seed)
        dp_rng, noise_gen = rng, None
        if dp is not None and not dp.reproducible:
            dp_rng = random.SystemRandom()
            noise_gen = torch.Generator().manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; harmless
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
        try:
            layers = _lora_layers(model)
            if not layers:
                raise ValueError(f"no module matched target_modules={list(spec.target_modules)}")
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
            model.train()
            losses: list[float] = []
            tokens_seen = target_tokens = 0
            queue: list[list[int]] = []
            epochs = 0
            start = time.perf_counter()
            bar = tqdm(total=steps, desc="lora", unit="step", disable=not progress, file=sys.stderr, leave=False)
            for _ in range(steps):
                if dp is None:
                    if not queue:
                        queue = _batches(lengths, batch_size, rng)
                        epochs += 1
                    batch = queue.pop()
                    ids, labels, mask = (t.to(dev) for t in collate([features[i] for i in batch], pad_id))
                    loss, n_target = causal_lm_target_loss(model, ids, labels, mask)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    loss_value = float(loss.detach())
                else:
                    batch, loss_value, n_target = _dp_step(
                        model, params, features, pad_id, batch_size, dp, dp_rng, noise_gen
                    )
                optimizer.step()
                scheduler.step()
                tokens_seen += sum(lengths[i] for i in batch)
                target_tokens += n_target
                losses.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.close()
            seconds = time.perf_counter() - start
            modules = {
                name: LoraModule(
                    A=layer.lora_A[ADAPTER_NAME].weight.detach().cpu().clone().contiguous(),
                    B=layer.lora_B[ADAPTER_NAME].weight.detach().cpu().clone().contiguous(),
                    scale=float(layer.scaling[ADAPTER_NAME]),
                )
                for name, layer in sorted(layers.items())
            }
        finally:
            peft_model.unload()  # puts the original nn.Linear modules back and drops model.peft_config
            for name, p in model.named_parameters():
                p.requires_grad_(grad_flags.get(name, p.requires_grad))
            model.train(was_training)
    finite = [x for x in losses if math.isfinite(x)]  # a DP step may sample no example at all
    last = [x for x in losses[-5:] if math.isfinite(x)]
    stats = {
        "steps": steps,
        "epochs": epochs if dp is None else steps * batch_size / len(features),
        "n_examples": len(features),
        "tokens_seen": tokens_seen,
        "target_tokens": target_tokens,
        "seconds": seconds,
        "tokens_per_s": tokens_seen / seconds if seconds > 0 else float("nan"),
        "first_loss": losses[0],
        "final_loss": sum(last) / len(last) if last else float("nan"),
        "mean_loss": sum(finite) / len(finite) if finite else float("nan"),
        "losses": losses,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "lora": spec.to_dict(),
    }
    if dp is not None:
        stats.update(_dp_epsilon(dp, sample_rate=min(1.0, batch_size / len(features)), steps=steps))
    return LoraAdapter(modules=modules, base_model=base_model), stats


def _dp_step(
    model: Any,
    params: list[torch.nn.Parameter],
    features: Sequence[dict],
    pad_id: int,
    batch_size: int,
    dp: DPConfig,
    rng: random.Random,
    noise_gen: torch.Generator | None = None,
) -> tuple[list[int], float, int]:
    """One DP-SGD step's gradient: Poisson batch, per-example clip, Gaussian noise, mean.

    Per-example gradients come from one backward per example (no padding, exact clipping); with
    batch sizes of a few examples on CPU that costs little over a padded batch.
    """
    q = min(1.0, batch_size / len(features))
    batch = [i for i in range(len(features)) if rng.random() < q]
    summed = [torch.zeros_like(p) for p in params]
    acc_dev = params[0].device if params else torch.device("cpu")
    losses: list[float] = []
    n_target = 0
    for i in batch:
        ids, labels, mask = (t.to(acc_dev) for t in collate([features[i]], pad_id))
        loss, n = causal_lm_target_loss(model, ids, labels, mask)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, dp.max_grad_norm / (float(norm) + 1e-12))
        for acc, g in zip(summed, grads, strict=True):
            acc.add_(g, alpha=factor)
        losses.append(float(loss.detach()))
        n_target += n
    expected = q * len(features)
    for p, acc in zip(params, summed, strict=True):
        noise = torch.randn(acc.shape, dtype=acc.dtype, generator=noise_gen).to(acc.device) * (
            dp.noise_multiplier * dp.max_grad_norm
        )  # drawn on the CPU: the same noise on any device
        p.grad = (acc + noise) / expected
    return batch, (sum(losses) / len(losses) if losses else float("nan")), n_target


def _dp_epsilon(dp: DPConfig, sample_rate: float, steps: int) -> dict[str, Any]:
    from common.privacy import dp_sgd_stats

    stats = dp_sgd_stats(dp.noise_multiplier, dp.max_grad_norm, dp.delta, sample_rate, steps)
    return {**stats, "dp_secure_rng": not dp.reproducible}
