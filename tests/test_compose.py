"""Composition of stored contexts equals an independent-prefill reference, for each model family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config

from kvstore.compress import compress
from kvstore.config import Settings
from kvstore.decode.blend import blend, later_segments_start
from kvstore.decode.cache import CompressedCache
from kvstore.decode.compose import compose
from kvstore.engine.models import LoadedModel
from kvstore.engine.rotary import PositionError, check_rotary
from kvstore.errors import InputError
from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.presses import NoPress, parse_press_spec
from kvstore.presses.base import Press
from kvstore.storage.store import ContextMeta, ContextStore
from kvstore.text.prompt import encode
from tests.tiny import sample_text, tiny_model, tiny_tokenizer

FAMILIES = ["llama", "qwen2", "qwen3"]
QUESTION = "what is the special magic number for the blue whale?"


def _documents() -> list[str]:
    return [sample_text(70, seed=10), sample_text(50, seed=11), sample_text(60, seed=12)]


@torch.no_grad()
def _reference_cache(loaded: LoadedModel, documents: list[str]) -> tuple[DynamicCache, int]:
    """head + A prefilled together; B and C each prefilled alone at their composed positions, seeing only
    the template head and themselves; returns the assembled dense cache and the composed length.

    Each segment's head copy sits right before it (positions start - len(head) .. start - 1): that is
    the prefill its stored keys came from, moved. With the one head at positions 0.. instead, a
    segment's hidden states would see the head from another distance and differ from any stored
    prefill from layer 1 on (the difference a blend step recomputes in part).
    """
    frame = loaded.frame
    head = frame.head_ids
    per_layer: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    start = len(head)
    for j, document in enumerate(documents):
        ids = encode(loaded.tokenizer, document)
        positions = list(range(start - len(head), start + len(ids)))
        cache = DynamicCache(config=loaded.model.config)
        loaded.model(torch.tensor([head + ids]), position_ids=torch.tensor([positions]), cache=cache)
        keep = slice(0 if j == 0 else len(head), None)
        for i, layer in enumerate(cache.layers):
            if len(per_layer) <= i:
                per_layer.append(([], []))
            per_layer[i][0].append(layer.keys[:, :, keep])
            per_layer[i][1].append(layer.values[:, :, keep])
        start += len(ids)
    reference = DynamicCache(config=loaded.model.config)
    for i, (keys, values) in enumerate(per_layer):
        reference.update(torch.cat(keys, dim=2), torch.cat(values, dim=2), i)
    return reference, start


@torch.no_grad()
def _question_logits(loaded: LoadedModel, cache, length: int) -> torch.Tensor:
    question = loaded.frame.question_ids(QUESTION)
    positions = torch.arange(len(question))[None] + length
    return loaded.model(torch.tensor([question]), position_ids=positions, cache=cache).logits[0]


def _positions_to_mask(layer: CompressedLayer, length: int) -> torch.Tensor:
    keep = torch.zeros(layer.kv_heads, length, dtype=torch.bool)
    heads = torch.repeat_interleave(torch.arange(layer.kv_heads), layer.lengths.long())
    keep[heads, layer.positions.long()] = True
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_composing_full_contexts_equals_the_independent_prefill_reference(family: str) -> None:
    loaded = tiny_model(family, seed=4)
    documents = _documents()
    parts = [compress(loaded, d, NoPress()) for d in documents]
    composed = compose(loaded, parts)
    reference, length = _reference_cache(loaded, documents)
    assert composed.original_length == length
    assert composed.kept_pairs == sum(p.kept_pairs for p in parts) - 2 * parts[0].prefix_length * parts[0].kv_heads * 3
    ours = _question_logits(loaded, CompressedCache(composed), length)
    expected = _question_logits(loaded, reference, length)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_composing_compressed_contexts_equals_the_reference_under_the_same_keep_masks(family: str) -> None:
    loaded = tiny_model(family, seed=5)
    documents = _documents()
    parts = [compress(loaded, d, parse_press_spec("kvzip:0.6")) for d in documents]
    composed = compose(loaded, parts)
    reference, length = _reference_cache(loaded, documents)
    layers = []
    for i, layer in enumerate(reference.layers):
        keep = torch.zeros(layer.keys.shape[1], length, dtype=torch.bool)
        start = parts[0].prefix_length
        for j, part in enumerate(parts):  # each part's own keep mask, moved to its composed positions
            mask = _positions_to_mask(part.layers[i], part.original_length)
            if j == 0:
                keep[:, : part.original_length] = mask
            else:
                keep[:, start : start + part.original_length - part.prefix_length] = mask[:, part.prefix_length :]
            start += part.original_length - part.prefix_length
        layers.append(CompressedLayer.from_dense(layer.keys[0], layer.values[0], keep))
    packed = CompressedKV(layers, composed.token_ids, composed.prefix_length)
    assert composed.kept_pairs == packed.kept_pairs
    for ours_layer, ref_layer in zip(composed.layers, packed.layers, strict=True):
        assert torch.equal(ours_layer.positions, ref_layer.positions)
    ours = _question_logits(loaded, CompressedCache(composed), length)
    expected = _question_logits(loaded, CompressedCache(packed), length)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def _unpruned(compressed: CompressedKV) -> CompressedKV:
    """The same context with pruned key channels stored as explicit zeros (what ThinK's scores equal)."""
    layers = []
    for layer in compressed.layers:
        dense = layer.keys.new_zeros(layer.keys.shape[0], layer.head_dim)
        heads = torch.repeat_interleave(torch.arange(layer.kv_heads), layer.lengths.long())
        index = layer.key_channels.long()[heads]
        dense.scatter_(1, index, layer.keys)
        layers.append(CompressedLayer(dense, layer.values, layer.lengths, layer.positions))
    return CompressedKV(layers, compressed.token_ids, compressed.prefix_length)


def test_think_pruned_contexts_compose_exactly() -> None:
    loaded = tiny_model("qwen3", seed=6)
    parts = [compress(loaded, d, parse_press_spec("kvzip:0.5+think:0.5")) for d in _documents()]
    assert all(layer.key_channels is not None for part in parts for layer in part.layers)
    composed = compose(loaded, parts)
    plain = compose(loaded, [_unpruned(p) for p in parts])
    length = composed.original_length
    torch.testing.assert_close(
        _question_logits(loaded, CompressedCache(composed), length),
        _question_logits(loaded, CompressedCache(plain), length),
        atol=1e-4,
        rtol=1e-4,
    )
    assert composed.kept_pairs == plain.kept_pairs


# Relative error (norm) of the question's logits allowed per stored quantization: measured about 1e-3
# (int8) and 2e-2 (int4) on these tiny models; "none" round-trips float32 exactly.
QUANT_TOLERANCE = {"none": 0.0, "int8": 5e-3, "int4": 5e-2}


@pytest.fixture(scope="module")
def think_and_kvzip_parts() -> tuple[LoadedModel, list[Press], list[CompressedKV]]:
    """Three compressed contexts of one tiny model, the second ThinK-pruned (built once for the module)."""
    loaded = tiny_model("qwen3", seed=13)
    presses = [parse_press_spec(spec) for spec in ("kvzip:0.5", "kvzip:0.5+think:0.5", "kvzip:0.6")]
    return loaded, presses, [compress(loaded, d, press) for d, press in zip(_documents(), presses, strict=True)]


@pytest.mark.parametrize("quant", list(QUANT_TOLERANCE))
def test_quantized_stored_contexts_compose_close_to_the_unquantized_composition(
    quant: str, tmp_path: Path, think_and_kvzip_parts: tuple[LoadedModel, list[Press], list[CompressedKV]]
) -> None:
    """Stored quantized (one ThinK-pruned too), loaded back through the store (dequantized), then composed."""
    loaded, presses, parts = think_and_kvzip_parts
    with ContextStore.open(Settings(home=tmp_path, redis_url=None)) as store:
        records = [
            store.put(p, ContextMeta.for_model(loaded, press.params()), quant=quant)[0]
            for p, press in zip(parts, presses, strict=True)
        ]
        assert {r.quant for r in records} == {quant}
        stored = [store.load(r.id, loaded.fingerprint, loaded.kv_shape) for r in records]
    assert stored[1].layers[0].key_channels is not None  # still ThinK-pruned after the round trip
    composed, plain = compose(loaded, stored), compose(loaded, parts)
    for ours_layer, plain_layer in zip(composed.layers, plain.layers, strict=True):
        assert torch.equal(ours_layer.lengths, plain_layer.lengths)
        assert torch.equal(ours_layer.positions, plain_layer.positions)
    length = plain.original_length
    ours = _question_logits(loaded, CompressedCache(composed), length)
    expected = _question_logits(loaded, CompressedCache(plain), length)
    error = float((ours - expected).norm() / expected.norm())
    assert error <= QUANT_TOLERANCE[quant], f"{quant}: relative logit error {error:.2e}"
    assert quant == "none" or error > 0  # the blobs really were quantized


def test_one_context_composes_to_itself_and_positions_continue() -> None:
    loaded = tiny_model("llama")
    part = compress(loaded, sample_text(40), NoPress())
    assert compose(loaded, [part]) is part
    pair = compose(loaded, [part, part])
    head = part.prefix_length
    assert pair.original_length == 2 * part.original_length - head
    assert pair.token_ids.tolist() == part.token_ids.tolist() + part.token_ids[head:].tolist()
    for layer in pair.layers:
        assert torch.equal(layer.positions[: layer.lengths[0]], torch.arange(pair.original_length, dtype=torch.int32))


def test_bad_compositions_are_refused_clearly() -> None:
    loaded = tiny_model("llama")
    with pytest.raises(InputError, match="nothing to compose"):
        compose(loaded, [])
    other = compress(tiny_model("qwen2"), sample_text(30), NoPress())
    mine = compress(loaded, sample_text(30), NoPress())
    with pytest.raises(InputError, match="not the same model"):
        compose(loaded, [mine, other])
    long = compress(loaded, sample_text(900), NoPress())
    window = loaded.model.config.max_position_embeddings
    with pytest.raises(PositionError, match=f"beyond the model's window of {window:,} tokens"):
        compose(loaded, [long] * (window // long.original_length + 1))


def test_a_model_without_rotary_positions_is_refused() -> None:
    tokenizer = tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256)
    model = AutoModelForCausalLM.from_config(config)
    loaded = LoadedModel("tiny-gpt2", model, tokenizer, "gpt2", "tok")
    with pytest.raises(PositionError, match="does not use rotary position embeddings"):
        check_rotary(loaded)


def test_blending_every_later_token_equals_the_joint_prefill() -> None:
    """With every later-segment token recomputed, the blend is the joint prefill of all documents."""
    loaded = tiny_model("qwen3", seed=8)
    documents = _documents()
    parts = [compress(loaded, d, NoPress()) for d in documents]
    composed = compose(loaded, parts)
    blended, count = blend(loaded, composed, later_segments_start(parts), fraction=1.0)
    assert count == composed.original_length - parts[0].original_length
    ids = loaded.frame.head_ids + [t for d in documents for t in encode(loaded.tokenizer, d)]
    joint = compress(loaded, ids[len(loaded.frame.head_ids) :], NoPress())
    length = composed.original_length
    torch.testing.assert_close(
        _question_logits(loaded, CompressedCache(blended), length),
        _question_logits(loaded, CompressedCache(joint), length),
        atol=1e-4,
        rtol=1e-4,
    )
    plain = _question_logits(loaded, CompressedCache(composed), length)
    assert not torch.allclose(plain, _question_logits(loaded, CompressedCache(joint), length), atol=1e-3)
    same, none = blend(loaded, composed, later_segments_start(parts), fraction=0.0)
    assert same is composed and none == 0
