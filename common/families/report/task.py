"""The report family's text task: prompts, training features, embedding texts and ROUGE-L.

Everything outside the report family sees it through ``common.families.base.Family``
(``common/families/report/family.py``); this ``Task`` protocol is the report family's own seam
between its training/evaluation code and the text format. What an example looks like as model
input, which tokens carry the loss, which text the site embedding z is pooled over and how a
prediction is scored are the task's business. ``TextReportTask`` is the radiology-report task
(findings -> impression / diagnosis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from common.families.report.data import Example

IGNORE_INDEX = -100  # label value torch's cross-entropy ignores: no loss on prompt tokens
SYSTEM_PROMPT = "You are a radiologist."
INSTRUCTIONS = {"impression": "Write the impression.", "diagnosis": "Give the diagnosis."}


@runtime_checkable
class Task(Protocol):
    """What the training, embedding and evaluation code needs to know about a kind of data."""

    name: str
    max_new_tokens: int

    def build_prompt(self, example: Example, tokenizer: Any) -> str:
        """The model input for ``example`` (no target), as the model will see it at inference."""
        ...

    def training_features(self, tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict]:
        """``[{"input_ids": [...], "labels": [...]}]`` with ``IGNORE_INDEX`` on non-target tokens."""
        ...

    def embedding_texts(self, examples: Sequence[Example]) -> list[str]:
        """The texts the site embedding z is pooled over; must not need labels."""
        ...

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Aggregate quality of predictions against references (higher is better)."""
        ...


def group_kind(group: str) -> str:
    """'impression' for report groups whose target is an impression (IU X-ray), else 'diagnosis'.

    MedPix targets are a short case diagnosis, so asking for an "impression" would mislead the model
    about the expected length and form.
    """
    return "impression" if group.startswith("xray") else "diagnosis"


@dataclass
class TextReportTask:
    """Radiology report generation: findings text in, impression or diagnosis text out.

    The prompt uses the model's chat template (system "You are a radiologist.", user
    "Findings: ...\\n<instruction>"). Findings are cut to ``max_findings_tokens`` tokens so that the
    prompt is the same at training and at inference and stays short on two CPU cores; targets are
    cut to ``max_target_tokens`` before the end-of-sequence token is appended.
    """

    name: str = "report-text"
    max_new_tokens: int = 32
    max_findings_tokens: int = 160
    max_target_tokens: int = 64
    use_stemmer: bool = True

    # -- prompts -------------------------------------------------------------------------------
    def _findings(self, example: Example, tokenizer: Any, max_tokens: int) -> str:
        text = example.prompt.strip()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()

    def _chat(self, findings: str, group: str, tokenizer: Any) -> str:
        user = f"Findings: {findings}\n{INSTRUCTIONS[group_kind(group)]}"
        if not getattr(tokenizer, "chat_template", None):  # a base (non-chat) model: plain text
            return f"{SYSTEM_PROMPT}\n{user}\nAnswer: "
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def build_prompt(self, example: Example, tokenizer: Any, max_findings_tokens: int | None = None) -> str:
        """The chat-formatted prompt, ending with the assistant header (the model writes next)."""
        limit = self.max_findings_tokens if max_findings_tokens is None else max_findings_tokens
        return self._chat(self._findings(example, tokenizer, limit), example.group, tokenizer)

    # -- training ------------------------------------------------------------------------------
    def training_features(self, tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict]:
        """Token ids of prompt + target + eos, with labels only on target + eos.

        If an example does not fit in ``max_length`` its findings are shortened further (the chat
        template and the target, already capped at ``max_target_tokens``, are never cut), so the
        model always learns to answer the same prompt shape it sees at inference.
        """
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token; the model could not learn where to stop")

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        features = []
        for ex in examples:
            if ex.target is None:
                raise ValueError(f"example {ex.uid!r} has no target: unlabeled data cannot be trained on")
            target = [*ids(ex.target.strip())[: self.max_target_tokens], eos]
            limit = self.max_findings_tokens
            prompt = ids(self.build_prompt(ex, tokenizer, limit))
            if len(prompt) + len(target) > max_length:
                overhead = len(prompt) - len(ids(self._findings(ex, tokenizer, limit)))
                limit = max_length - len(target) - overhead
                if limit < 1:
                    raise ValueError(
                        f"max_length={max_length} is too small for the prompt template and "
                        f"target of {ex.uid!r} ({overhead} + {len(target)} tokens)"
                    )
                prompt = ids(self.build_prompt(ex, tokenizer, limit))
                prompt = prompt[: max_length - len(target)]  # re-tokenisation may add a token
            features.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
        return features

    # -- embedding -----------------------------------------------------------------------------
    def embedding_texts(self, examples: Sequence[Example]) -> list[str]:
        """The raw findings text: a new site has no labels, and the chat template is the same for
        every site, so including it would only dilute what distinguishes sites."""
        return [ex.prompt for ex in examples]

    # -- scoring -------------------------------------------------------------------------------
    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Mean ROUGE-L F1 (rouge_score, Porter stemming) and the number of pairs."""
        value = rouge_l(predictions, references, use_stemmer=self.use_stemmer)
        return {"rouge_l": value, "n": len(predictions)}


def rouge_l(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> float:
    """Mean ROUGE-L F1 over pairs; an empty prediction scores 0, an empty list is an error."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    pairs = zip(predictions, references, strict=True)
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in pairs)
    return float(total / len(predictions))
