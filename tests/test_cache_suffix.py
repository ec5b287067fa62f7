"""The compressed cache's suffix grows in place, forks share the prefix, unsupported attention is refused."""

from __future__ import annotations

import pytest
import torch

from kvstore.compress import compress
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.attention import UnsupportedAttentionError, check_ragged_kwargs, clear_pending
from kvstore.presses import parse_press_spec
from tests.factories import random_compressed
from tests.tiny import sample_text, tiny_model


def test_suffix_grows_into_preallocated_buffers_and_reset_frees_them() -> None:
    cache = CompressedCache(random_compressed(layers=1, kv_heads=2, head_dim=8))
    layer = cache.layers[0]
    kept = cache.nbytes
    cache.reserve(10)
    steps = [torch.randn(3, 2, n, 8) for n in (4, 1, 1, 1)]
    storages = set()
    for step in steps:
        keys, values = layer.update(step, -step)
        clear_pending()  # no model call takes the attention hand-over here
        storages.add(keys.untyped_storage().data_ptr())
    cache.reset()
    expected = torch.cat(steps, dim=2)
    torch.testing.assert_close(keys, expected)
    torch.testing.assert_close(values, -expected)
    assert len(storages) == 1  # every token went into the same buffer: no copy per token
    assert layer.suffix_length == 0 and cache.nbytes == kept


def test_suffix_outgrowing_its_buffer_keeps_every_row() -> None:
    layer = CompressedCache(random_compressed(layers=1, kv_heads=2, head_dim=8)).layers[0]
    steps = [torch.randn(1, 2, 1, 8) for _ in range(150)]  # past the default capacity, twice
    for step in steps:
        keys, _ = layer.update(step, step)
        clear_pending()
    layer.reset()
    torch.testing.assert_close(keys, torch.cat(steps, dim=2))


def test_forks_share_the_prefix_and_decode_independently() -> None:
    loaded = tiny_model("llama", seed=3)
    compressed = compress(loaded, sample_text(200, seed=2), parse_press_spec("kvzip", 0.5))
    cache = CompressedCache(compressed)
    fork = cache.fork()
    assert fork.layers[0].prefix.keys.data_ptr() == cache.layers[0].prefix.keys.data_ptr()
    options = GenerationOptions(max_new_tokens=6)
    alone = answer_many(loaded, cache, ["the vault"], options)
    cache.reserve(8)
    cache.layers[0].update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))  # a batch mid-way in the original
    clear_pending()
    assert answer_many(loaded, fork, ["the vault"], options) == alone
    assert fork.kernel == cache.kernel


def test_ragged_path_refuses_what_it_cannot_honour() -> None:
    check_ragged_kwargs({"sliding_window": 4096, "softcap": None}, seq_length=4000)  # window changes nothing
    with pytest.raises(UnsupportedAttentionError, match="sliding window of 512"):
        check_ragged_kwargs({"sliding_window": 512}, seq_length=4000)
    with pytest.raises(UnsupportedAttentionError, match="softcap=50.0"):
        check_ragged_kwargs({"softcap": 50.0}, seq_length=10)
    with pytest.raises(UnsupportedAttentionError, match="sinks"):
        check_ragged_kwargs({"s_aux": torch.zeros(4)}, seq_length=10)


def test_a_model_with_a_short_sliding_window_is_refused_at_decode() -> None:
    loaded = tiny_model("qwen2", seed=1)
    compressed = compress(loaded, sample_text(120, seed=1), parse_press_spec("none", 0.0))
    loaded.model.config.use_sliding_window = True
    for layer in loaded.model.model.layers:
        layer.self_attn.sliding_window = 16
    with pytest.raises(UnsupportedAttentionError, match="sliding window of 16"):
        answer_many(loaded, CompressedCache(compressed), ["the vault"], GenerationOptions(max_new_tokens=2))


def test_memory_in_use_is_what_was_kept() -> None:
    compressed = random_compressed(layers=2, kv_heads=3, head_dim=8)
    cache = CompressedCache(compressed)
    held = sum(layer.prefix.keys.numel() + layer.prefix.values.numel() for layer in cache.layers)
    assert held == compressed.kept_elements  # no padding of the stored prefix
    assert cache.layers[0].prefix.keys.data_ptr() == compressed.layers[0].keys.data_ptr()  # not even a copy
