"""Site embeddings: masked token mean equals a naive unpadded loop, independent of batching."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from common.embedding import (
    EmbeddingResult,
    EmptyDatasetError,
    mean_embedding,
    representation_spec,
    sentence_embedding,
)
from common.models import load_base_model

TEXTS = [
    "No acute cardiopulmonary abnormality.",
    "Large right pleural effusion with compressive atelectasis of the right lower lobe. Heart size normal.",
    "Hyperdense left MCA.",
    "Multiple ring-enhancing lesions in both cerebral hemispheres with surrounding vasogenic edema, "
    "the largest in the right frontal lobe measuring 2.3 cm, with mass effect on the lateral ventricle.",
    "Normal.",
    "Lumbar disc herniation at L4-L5 compressing the traversing nerve root.",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def naive_mean(model, tok, texts, layer):
    """Reference: one unpadded forward per text, all token vectors summed, divided by the count."""
    total, count = torch.zeros(model.config.hidden_size, dtype=torch.float64), 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[layer][0]
            total += hidden.double().sum(0)
            count += hidden.shape[0]
    return (total / count).float().numpy(), count


@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_masked_mean_matches_naive_loop(tiny, layer) -> None:
    model, tok = tiny
    expected, count = naive_mean(model, tok, TEXTS, layer)
    got = mean_embedding(model, tok, TEXTS, layer=layer, progress=False)
    assert isinstance(got, EmbeddingResult)
    assert got.z.dtype == np.float32 and got.z.shape == (model.config.hidden_size,)
    assert got.n_tokens == count and got.n_examples == len(TEXTS)
    assert got.layer == layer % (model.config.num_hidden_layers + 1)
    assert got.representation == "hidden-mean"
    np.testing.assert_allclose(got.z, expected, atol=1e-5, rtol=1e-5)


def test_not_a_mean_of_means(tiny) -> None:
    model, tok = tiny
    texts = TEXTS[:2]
    z = mean_embedding(model, tok, texts, progress=False).z
    per_example = [mean_embedding(model, tok, [t], progress=False).z for t in texts]
    assert not np.allclose(z, np.mean(per_example, axis=0), atol=1e-4)


@pytest.mark.parametrize("batch_tokens", [1, 16, 64, 100_000])
def test_independent_of_batching(tiny, batch_tokens) -> None:
    model, tok = tiny
    texts = TEXTS * 3
    ref = mean_embedding(model, tok, texts, batch_tokens=4096, progress=False)
    got = mean_embedding(model, tok, texts, batch_tokens=batch_tokens, progress=False)
    assert got.n_tokens == ref.n_tokens
    np.testing.assert_allclose(got.z, ref.z, atol=1e-5)


def test_truncation_and_mode_restored(tiny) -> None:
    model, tok = tiny
    model.train()
    try:
        got = mean_embedding(model, tok, ["word " * 500], max_length=32, progress=False)
        assert got.n_tokens == 32
        assert model.training  # the caller's mode is restored
    finally:
        model.eval()


def test_empty_dataset_errors(tiny) -> None:
    model, tok = tiny
    with pytest.raises(EmptyDatasetError, match="no examples"):
        mean_embedding(model, tok, [], progress=False)
    with pytest.raises(EmptyDatasetError, match="all 2 texts are empty"):
        mean_embedding(model, tok, ["", ""], progress=False)
    with pytest.raises(EmptyDatasetError, match="no examples"):
        sentence_embedding([])
    with pytest.raises(ValueError, match="out of range"):
        mean_embedding(model, tok, TEXTS, layer=7, progress=False)


def test_representation_spec(tiny) -> None:
    model, _ = tiny
    assert representation_spec(model=model) == {"representation": "hidden-mean", "layer": 2, "dim": 64}
    assert representation_spec(layer=1, dim=576) == {"representation": "hidden-mean", "layer": 1, "dim": 576}
    assert representation_spec("minilm") == {"representation": "minilm", "layer": None, "dim": 384}
    got = mean_embedding(model, tiny[1], TEXTS[:1], progress=False)
    assert got.spec() == representation_spec(layer=-1, model=model)
    with pytest.raises(ValueError):
        representation_spec("pca", dim=3)


def test_sentence_embedding_minilm() -> None:
    start = time.perf_counter()
    got = sentence_embedding(TEXTS)
    assert time.perf_counter() - start < 60
    assert got.z.shape == (384,) and got.z.dtype == np.float32
    assert np.all(np.isfinite(got.z)) and 0.1 < float(np.linalg.norm(got.z)) <= 1.0 + 1e-6
    assert got.representation == "minilm" and got.n_examples == len(TEXTS)
    other = sentence_embedding(["Normal chest radiograph."] * 3)
    assert not np.allclose(got.z, other.z)


def test_cached_example_sums_give_the_same_z_and_skip_the_model(tiny, tmp_path) -> None:
    """A site's embedding query re-reads the reports it enrolled with: their token sums come from the
    cache (the model runs only on the new texts), and z, clipped or not, is the same function."""
    from common.embedding import ExampleSumsCache

    model, tok = tiny
    calls: list[int] = []
    hook = model.model.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    try:
        cache = ExampleSumsCache(tmp_path / "sums.npz")
        first = mean_embedding(model, tok, TEXTS[:4], progress=False, cache=cache, cache_tag="base-1")
        assert len(cache) == 4 and calls
        cache.save()
        calls.clear()
        again = ExampleSumsCache(tmp_path / "sums.npz")  # a later ClientApp process
        assert len(again) == 4
        both = mean_embedding(model, tok, TEXTS, progress=False, cache=again, cache_tag="base-1", batch_tokens=1 << 20)
        assert len(calls) == 1  # one batch, with the two new texts only
        clipped = mean_embedding(model, tok, TEXTS, progress=False, cache=again, cache_tag="base-1", clip_norm=0.5)
        assert len(calls) == 1  # everything cached now
        calls.clear()
        other = mean_embedding(model, tok, TEXTS[:1], progress=False, cache=again, cache_tag="base-2")
        assert calls, "another model (tag) must not read this model's sums"
    finally:
        hook.remove()
    np.testing.assert_allclose(first.z, mean_embedding(model, tok, TEXTS[:4], progress=False).z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.z, mean_embedding(model, tok, TEXTS, progress=False).z, rtol=1e-5, atol=1e-6)
    plain_clipped = mean_embedding(model, tok, TEXTS, progress=False, clip_norm=0.5)
    np.testing.assert_allclose(clipped.z, plain_clipped.z, rtol=1e-5, atol=1e-6)
    assert clipped.n_clipped == plain_clipped.n_clipped and other.n_examples == 1
    (tmp_path / "sums.npz").write_bytes(b"torn")
    assert len(ExampleSumsCache(tmp_path / "sums.npz")) == 0  # unreadable: an empty cache, not an error
