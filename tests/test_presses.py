"""Each press on the tiny models: its rule on hand-made patterns, its kept count, and decoding afterwards."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from kvstore.compress import compress
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.attention import observing
from kvstore.engine.prefill import prefill
from kvstore.presses import (
    PRESSES,
    H2OPress,
    KVComposePress,
    KVzipHeadPress,
    PyramidKVPress,
    SnapKVPress,
    TOVAPress,
    make_press,
)
from kvstore.presses import kvzip_head as kvzip_head_module
from kvstore.presses.base import prefill_context
from kvstore.presses.budget import composite_budget, composite_counts, kept_count, pyramid_counts, select
from kvstore.presses.kvzip_head import head_counts, head_importance
from kvstore.presses.received import ReceivedAttention
from kvstore.presses.snapkv import pool_positions, window_scores
from tests.tiny import sample_text, tiny_model


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", seed=7)


@pytest.fixture(scope="module")
def run(loaded):
    return prefill_context(loaded, sample_text(150, seed=9))


def _crafted(run, observer: ReceivedAttention, spikes: dict[int, dict[tuple[int, int], float]]):
    """The run with `observer` holding zero sums except {layer: {(query_head, doc_token): value}}."""
    q_heads = run.loaded.model.config.num_attention_heads
    for layer in range(len(run.cache.layers)):
        observer.sums[layer] = torch.zeros(q_heads, run.length)
        for (head, token), value in spikes.get(layer, {}).items():
            observer.sums[layer][head, run.prefix_length + token] = value
    return replace(run, prefill_observer=observer)


def _ratio_keeping(count: int, tokens: int) -> float:
    ratio = 1.0 - count / tokens
    assert kept_count(tokens, ratio) == count
    return ratio


class _Recorder:
    def __init__(self) -> None:
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value, scaling) -> None:
        self.seen[layer_idx] = (query[0].clone(), key[0].clone())


@pytest.mark.parametrize("first_from_end", [None, 10])
def test_received_attention_over_chunked_prefill_equals_full_attention(loaded, run, first_from_end) -> None:
    first = 0 if first_from_end is None else run.length - first_from_end
    observer = ReceivedAttention(run.length, first)
    with observing(observer):
        prefill(loaded.model, run.input_ids, chunk_size=13)  # many chunks, window split across two
    recorder = _Recorder()
    with torch.no_grad(), observing(recorder):
        loaded.model(run.input_ids)
    for layer, (query, key) in recorder.seen.items():
        group = query.shape[0] // key.shape[0]
        logits = query @ key.repeat_interleave(group, dim=0).transpose(1, 2) / math.sqrt(query.shape[-1])
        causal = torch.ones(run.length, run.length, dtype=torch.bool).tril()
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(observer.sums[layer], probs[:, first:].sum(dim=1), atol=1e-4, rtol=1e-4)


def test_h2o_sums_received_attention_and_pools_gqa_groups(run) -> None:
    # query heads 0 and 1 share KV head 0: token 5 gets 10 from head 0, token 7 gets 4 from head 1
    crafted = _crafted(run, ReceivedAttention(run.length, 0), {0: {(0, 5): 10.0, (1, 7): 4.0}})
    mean_scores = H2OPress(compression_ratio=0.5, group_reduce="mean").score(crafted)
    max_scores = H2OPress(compression_ratio=0.5, group_reduce="max").score(crafted)
    assert (mean_scores[0][0, 5], mean_scores[0][0, 7]) == (5.0, 2.0)
    assert (max_scores[0][0, 5], max_scores[0][0, 7]) == (10.0, 4.0)
    press = H2OPress(compression_ratio=_ratio_keeping(2, run.doc_length))
    masks = press.keep_masks(crafted)
    assert masks[0][0].nonzero().flatten().tolist() == [5, 7]
    with pytest.raises(ValueError, match="group_reduce"):
        H2OPress(compression_ratio=0.5, group_reduce="median")


def test_snapkv_pooling_and_window_on_hand_made_rows() -> None:
    row = torch.tensor([[0.0, 0, 0, 5, 0, 0, 0, 0, 0, 1]])
    assert pool_positions(row, 3, "max").tolist() == [[0, 0, 5, 5, 5, 0, 0, 0, 1, 1]]
    torch.testing.assert_close(pool_positions(row, 3, "avg"), torch.tensor([[0, 0, 5, 5, 5, 0, 0, 0, 1, 1]]) / 3)
    scores = window_scores(row, window_size=2, kernel_size=3, pooling="max")
    assert scores[0, :8].tolist() == [0, 0, 5, 5, 5, 0, 0, 0]  # the window's own columns are not pooled
    assert bool((scores[0, 8:] > 5).all()) and scores[0, 9] > scores[0, 8]


def test_snapkv_keeps_window_and_pooled_neighbourhood(run) -> None:
    press = SnapKVPress(compression_ratio=_ratio_keeping(8 + 5, run.doc_length), window_size=8, kernel_size=5)
    observer = press.watch_prefill(run.prefix_length, run.length)
    assert observer.first_query == run.length - 8
    spikes = {layer: {(head, 20): 1.0 for head in range(4)} for layer in range(3)}
    masks = press.keep_masks(_crafted(run, observer, spikes))
    expected = list(range(18, 23)) + list(range(run.doc_length - 8, run.doc_length))
    for mask in masks:
        for head_mask in mask:
            assert head_mask.nonzero().flatten().tolist() == expected


def test_tova_ranks_by_last_token_attention_averaged_over_all_heads(run) -> None:
    press = TOVAPress(compression_ratio=_ratio_keeping(2, run.doc_length))
    observer = press.watch_prefill(run.prefix_length, run.length)
    assert observer.first_query == run.length - 1
    spikes = {layer: {(0, 3): 1.0, (3, 9): 0.5, (1, 30): 0.2} for layer in range(3)}
    crafted = _crafted(run, observer, spikes)
    scores = press.score(crafted)
    assert scores[0][:, 3].tolist() == [0.25, 0.25] and scores[0][:, 9].tolist() == [0.125, 0.125]
    for mask in press.keep_masks(crafted):  # both KV heads keep the layer's shared choice
        assert mask.nonzero()[:, 1].tolist() == [3, 9, 3, 9]


def test_pyramid_counts_follow_the_formulas() -> None:
    # k_total 400 over m=4 layers, beta 20: top 400/80 = 5, bottom 200 - 5 = 195, arithmetic in between
    assert pyramid_counts(4, 1000, 400, beta=20) == [195, 132, 68, 5]
    assert pyramid_counts(3, 100, 270, beta=20) == [100, 100, 70]  # capped layers pass their overflow up
    assert pyramid_counts(1, 10, 5) == [5]
    with pytest.raises(ValueError, match="beta"):
        pyramid_counts(4, 10, 5, beta=0.5)


def test_pyramidkv_gives_lower_layers_more_and_keeps_the_count(run) -> None:
    press = PyramidKVPress(compression_ratio=0.75, window_size=8)
    masks = press.keep_masks(run)  # no observer: the press replays the prefill to watch it
    layers, tokens = len(masks), run.doc_length
    expected = pyramid_counts(layers, tokens, kept_count(layers * tokens, 0.75), press.beta)
    assert [mask.sum(-1).tolist() for mask in masks] == [[n, n] for n in expected]
    assert expected[0] > expected[1] > expected[2]
    for mask, n in zip(masks, expected, strict=True):  # SnapKV's window comes first, latest tokens first
        assert bool(mask[:, tokens - min(n, 8) :].all())


def test_composite_budget_aligns_heads_and_ranks_composites_across_layers() -> None:
    scores = [
        torch.tensor([[9.0, 1, 0, 0], [0, 0, 8, 2]]),  # composites: (9+8)/2, (1+2)/2, 0, 0
        torch.tensor([[0.0, 5, 4, 0], [3, 0, 0, 6]]),  # composites: (5+6)/2, (4+3)/2, 0, 0
    ]
    assert composite_counts(scores, 3) == [1, 2]  # 8.5 (layer 0), 5.5 and 3.5 (layer 1)
    masks = composite_budget(scores, ratio=1 - 3 / 8)
    assert masks[0].tolist() == [[True, False, False, False], [False, False, True, False]]
    assert masks[1].tolist() == [[False, True, True, False], [True, False, False, True]]
    assert select(scores, 1 - 3 / 8, "composite")[1].tolist() == masks[1].tolist()


def test_kvcompose_stabilises_scores_with_the_head_mean(run) -> None:
    base = H2OPress(compression_ratio=0.5).score(run)
    ours = KVComposePress(compression_ratio=0.5, scorer="h2o", head_mean=0.5).score(run)
    for b, o in zip(base, ours, strict=True):
        torch.testing.assert_close(o, b + 0.5 * b.mean(dim=0, keepdim=True))
    with pytest.raises(ValueError, match="scorer"):
        KVComposePress(compression_ratio=0.5, scorer="kvcompose")
    with pytest.raises(ValueError, match="scorer"):
        KVComposePress(compression_ratio=0.5, scorer="think")  # a channel stage scores no token


def test_head_counts_fill_whole_heads_by_importance() -> None:
    importance = torch.tensor([[0.1, 0.9], [0.5, 0.3]])
    # 4 heads x 10 streaming = 40; 210 spare = 2 full heads (90 each) + 30 more for the third head
    assert head_counts(importance, tokens=100, kept=250, streaming=10).tolist() == [[10, 100], [100, 40]]
    # below the streaming floor: 30 = 7 each, the two most important heads one more
    assert head_counts(importance, tokens=100, kept=30, streaming=10).tolist() == [[7, 8], [8, 7]]


def test_kvzip_head_keeps_full_heads_or_sinks_and_recent(loaded, run, monkeypatch) -> None:
    importance = torch.tensor([[0.2, 0.1], [0.9, 0.3], [0.4, 0.05]])
    key = (loaded.fingerprint, loaded.tokenizer_fingerprint)
    monkeypatch.setitem(kvzip_head_module._IMPORTANCE, key, importance)
    tokens, heads = run.doc_length, importance.numel()
    streaming = 4 + 10
    kept = 2 * tokens + (heads - 2) * streaming  # exactly the two most important heads in full
    press = KVzipHeadPress(compression_ratio=_ratio_keeping(kept, heads * tokens), n_sink=4, window=10)
    masks = press.keep_masks(run)
    stream = torch.zeros(tokens, dtype=torch.bool)
    stream[:4] = True
    stream[-10:] = True
    for layer, mask in enumerate(masks):
        for head, head_mask in enumerate(mask):
            full = (layer, head) in {(1, 0), (2, 0)}
            assert bool((head_mask == (torch.ones_like(stream) if full else stream)).all())


def test_head_importance_is_computed_once_per_model(loaded) -> None:
    first = head_importance(loaded)
    assert first.shape == (3, 2) and bool((first > 0).all()) and bool((first <= 1).all())
    assert head_importance(loaded) is first


def _expected_kept_doc_pairs(press, layers: int, heads: int, tokens: int) -> int:
    ratio = press.compression_ratio
    if press.budget in ("global", "floored", "heads"):
        return kept_count(layers * heads * tokens, ratio)
    if press.budget == "uniform":
        return layers * heads * kept_count(tokens, ratio)
    return heads * kept_count(layers * tokens, ratio)  # pyramid / composite: per-head sums over layers


@pytest.mark.parametrize(
    "name", ["h2o", "snapkv", "tova", "pyramidkv", "kvcompose", "kvzip_head", "streaming", "kvzip"]
)
def test_every_press_keeps_its_count_and_decodes(name: str) -> None:
    loaded = tiny_model("qwen3", seed=3)
    press = make_press(name, 0.75)
    compressed = compress(loaded, sample_text(200, seed=4), press)
    layers, heads = len(compressed.layers), compressed.kv_heads
    tokens = compressed.original_length - compressed.prefix_length
    kept_doc = compressed.kept_pairs - compressed.prefix_length * layers * heads
    assert kept_doc == _expected_kept_doc_pairs(press, layers, heads, tokens)
    if name in ("kvcompose", "pyramidkv", "tova", "snapkv", "h2o"):
        assert all(layer.lengths.unique().numel() == 1 for layer in compressed.layers)  # same count per head
    cache = CompressedCache(compressed)
    answers = answer_many(loaded, cache, ["the vault", "users"], GenerationOptions(max_new_tokens=4))
    assert len(answers) == 2 and cache.get_seq_length() == compressed.original_length


@pytest.mark.parametrize("name", sorted(set(PRESSES) - {"none", "think"}))
def test_scoring_once_then_cutting_equals_keep_masks(name: str, loaded) -> None:
    """The eval scores once and cuts at several ratios: every press must cut the same way both routes."""
    press = make_press(name, 0.6)
    run = prefill_context(loaded, sample_text(120, seed=3), press)
    direct = press.keep_masks(run)
    reused = press.masks_from_scores(press.score(run), run)
    assert all(torch.equal(a, b) for a, b in zip(direct, reused, strict=True))
