"""With nothing evicted, the compressed cache must reproduce vanilla transformers exactly."""

from __future__ import annotations

import pytest
import torch

from kvstore.compress import compress
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many, decode_tokens
from kvstore.presses import NoPress
from kvstore.text.prompt import ChatFrame
from tests.tiny import sample_text, tiny_model

FAMILIES = ["llama", "qwen2", "qwen3"]


def _vanilla_logits(loaded, context_ids: torch.Tensor, question_ids: list[int]) -> torch.Tensor:
    """The whole sequence through stock eager attention, no cache: the ground truth."""
    loaded.model.set_attn_implementation("eager")
    try:
        full = torch.cat([context_ids, torch.tensor([question_ids])], dim=1)
        with torch.no_grad():
            logits = loaded.model(full).logits
    finally:
        loaded.model.set_attn_implementation("kvstore")
    return logits[0, -len(question_ids) :]


@pytest.mark.parametrize("family", FAMILIES)
def test_question_logits_match_vanilla_full_context(family: str) -> None:
    loaded = tiny_model(family)
    document = sample_text(300)
    frame = ChatFrame.for_tokenizer(loaded.tokenizer)
    question = frame.question_ids("what is the special magic number for the blue whale?")
    compressed = compress(loaded, document, NoPress())
    cache = CompressedCache(compressed)
    positions = torch.arange(len(question))[None] + compressed.original_length
    with torch.no_grad():
        ours = loaded.model(torch.tensor([question]), position_ids=positions, cache=cache).logits[0]
    expected = _vanilla_logits(loaded, frame.context_ids(document), question)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_tokens_match_vanilla_generate(family: str) -> None:
    loaded = tiny_model(family, seed=1)
    document = sample_text(200, seed=3)
    frame = ChatFrame.for_tokenizer(loaded.tokenizer)
    question = frame.question_ids("Repeat the passcode")
    full = torch.cat([frame.context_ids(document), torch.tensor([question])], dim=1)
    vanilla = loaded.model.generate(full, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, full.shape[1] :]
    cache = CompressedCache(compress(loaded, document, NoPress()))
    ours = torch.stack(list(decode_tokens(loaded, cache, [question], {-1}, GenerationOptions(max_new_tokens=12))))[:, 0]
    assert ours.tolist() == vanilla.tolist()


def test_hf_generate_runs_on_compressed_cache() -> None:
    """Callers may run model.generate themselves: context ids + question, our cache as `cache=`."""
    loaded = tiny_model("llama", seed=2)
    document = sample_text(150, seed=4)
    frame = ChatFrame.for_tokenizer(loaded.tokenizer)
    question = frame.question_ids("the vault")
    full = torch.cat([frame.context_ids(document), torch.tensor([question])], dim=1)
    vanilla = loaded.model.generate(full, max_new_tokens=8, do_sample=False, eos_token_id=None)
    cache = CompressedCache(compress(loaded, document, NoPress()))
    ours = loaded.model.generate(full, cache=cache, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert ours.tolist() == vanilla.tolist()


def test_batched_questions_equal_one_by_one_and_cache_returns_to_prefix() -> None:
    loaded = tiny_model("qwen2", seed=5)
    cache = CompressedCache(compress(loaded, sample_text(250, seed=6), NoPress()))
    questions = ["the vault", "what is the special magic number for the quick brown fox?", "users"]
    batched = answer_many(loaded, cache, questions, GenerationOptions(max_new_tokens=10))
    single = [answer_many(loaded, cache, [q], GenerationOptions(max_new_tokens=10))[0] for q in questions]
    assert batched == single
    assert all(layer.suffix_length == 0 for layer in cache.layers)
    assert cache.get_seq_length() == cache.original_length


def test_cache_without_kvstore_attention_fails_loudly() -> None:
    loaded = tiny_model("llama")
    cache = CompressedCache(compress(loaded, sample_text(50), NoPress()))
    loaded.model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="attn_implementation='kvstore'"):
            loaded.model(torch.tensor([[5, 6, 7]]), cache=cache)
    finally:
        loaded.model.set_attn_implementation("kvstore")
        cache.reset()
