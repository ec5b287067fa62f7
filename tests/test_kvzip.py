"""KVzip scores against a naive full-attention reference of the same formula, plus budgets and packing."""

from __future__ import annotations

import pytest
import torch

from kvstore.compress import compress, pack
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.attention import observing
from kvstore.presses import KVzipPress, StreamingLLMPress
from kvstore.presses.base import prefill_context
from kvstore.presses.budget import LAYER_FLOOR, kept_count, select
from kvstore.text.prompt import encode
from tests.tiny import sample_text, tiny_model


class _Recorder:
    def __init__(self) -> None:
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value, scaling) -> None:
        self.seen[layer_idx] = (query[0].clone(), key[0].clone())


def _naive_kvzip_scores(loaded, input_ids: torch.Tensor, prefix_len: int, chunk: int, tail: list[int]):
    """One uncached forward of [context + reconstruction] per chunk; full (T+R)^2 attention, then mask."""
    tok = loaded.tokenizer
    length = input_ids.shape[1]
    n_layers = loaded.model.config.num_hidden_layers
    scores = None
    for start in range(prefix_len, length, chunk):
        stop = min(length, start + chunk)
        if start == prefix_len:
            prompt = encode(tok, "\n\nRepeat the previous context exactly.") + tail
        else:
            quoted = input_ids[0, start - 8 : start].tolist()
            prompt = encode(tok, "\n\nRepeat the part of the previous context exactly, starting with ") + quoted + tail
        recon = prompt + input_ids[0, start:stop].tolist()
        full = torch.cat([input_ids, torch.tensor([recon])], dim=1)
        recorder = _Recorder()
        with torch.no_grad(), observing(recorder):
            loaded.model(full)
        n = full.shape[1]
        rows = torch.arange(length, n)
        cols = torch.arange(n)
        allowed = (cols[None] < prefix_len) | ((cols[None] >= start) & (cols[None] < stop))
        allowed = allowed | ((cols[None] >= length) & (cols[None] <= rows[:, None]))
        for layer in range(n_layers):
            query, key = recorder.seen[layer]
            kv_heads = key.shape[0]
            if scores is None:
                scores = [torch.zeros(kv_heads, length - prefix_len) for _ in range(n_layers)]
            group = query.shape[0] // kv_heads
            for q_head in range(query.shape[0]):
                logits = query[q_head, length:] @ key[q_head // group].T / query.shape[-1] ** 0.5
                probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
                best = probs[:, start:stop].amax(dim=0)
                target = scores[layer][q_head // group, start - prefix_len : stop - prefix_len]
                torch.maximum(target, best, out=target)
    return scores


def test_kvzip_scores_equal_naive_reference_across_chunks() -> None:
    loaded = tiny_model("llama", seed=11)
    run = prefill_context(loaded, sample_text(120, seed=2))
    press = KVzipPress(compression_ratio=0.5, chunk_size=40, precision="model")
    ours = press.score(run)
    expected = _naive_kvzip_scores(loaded, run.input_ids, run.prefix_length, 40, loaded.frame.tail_ids)
    assert run.doc_length > 80  # several chunks, so the quoted-overlap prompt is exercised
    for layer_ours, layer_expected in zip(ours, expected, strict=True):
        torch.testing.assert_close(layer_ours, layer_expected, atol=1e-5, rtol=1e-4)
    assert run.cache.get_seq_length() == run.length  # reconstruction tokens were removed


def test_bfloat16_scoring_stays_close_to_the_exact_scores_and_keeps_nearly_the_same_pairs() -> None:
    loaded = tiny_model("qwen3", seed=5)
    run = prefill_context(loaded, sample_text(120, seed=4))
    exact = KVzipPress(compression_ratio=0.5, chunk_size=40, precision="model")
    fast = KVzipPress(compression_ratio=0.5, chunk_size=40)  # bfloat16 is the default
    exact_scores, fast_scores = exact.score(run), fast.score(run)
    assert run.cache.layers[0].keys.dtype == torch.float32  # the stored cache keeps the model's dtype
    for layer_exact, layer_fast in zip(exact_scores, fast_scores, strict=True):
        assert layer_fast.dtype == torch.float32
        torch.testing.assert_close(layer_fast, layer_exact, atol=0.02, rtol=0.05)
    kept_exact = torch.cat([m.flatten() for m in select(exact_scores, 0.5, "global")])
    kept_fast = torch.cat([m.flatten() for m in select(fast_scores, 0.5, "global")])
    assert (kept_exact == kept_fast).float().mean() > 0.95


def test_unknown_kvzip_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        KVzipPress(compression_ratio=0.5, precision="float8")


def test_global_budget_keeps_exact_count_with_uneven_layers_and_heads() -> None:
    scores = [torch.tensor([[9.0, 8.0, 7.0, 6.0], [0.1, 0.2, 0.3, 0.4]]), torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 2)]
    masks = select(scores, ratio=0.5, budget="global")
    # the 8 largest of all 16: layer 0 head 0 keeps all four, head 1 two; layer 1 keeps one per head
    assert masks[0].tolist() == [[True] * 4, [False, False, True, True]]
    assert masks[1].tolist() == [[True, False, False, False]] * 2


def test_floored_budget_gives_a_starved_layer_its_floor_and_otherwise_equals_global() -> None:
    gen = torch.Generator().manual_seed(0)
    loud, quiet = torch.rand(3, 100, generator=gen) + 1.0, torch.rand(3, 100, generator=gen) * 0.01
    scores = [loud, quiet, loud.flip(-1)]
    ratio = 0.9
    floored, plain = select(scores, ratio, "floored"), select(scores, ratio, "global")
    total = kept_count(900, ratio)
    assert sum(int(m.sum()) for m in floored) == sum(int(m.sum()) for m in plain) == total
    assert int(plain[1].sum()) == 0  # the global threshold starves the quiet layer entirely
    floor = int(LAYER_FLOOR * kept_count(300, ratio))
    assert int(floored[1].sum()) == floor > 0
    top_quiet = quiet.flatten().topk(floor).indices  # and the floor is that layer's own best pairs
    assert bool(floored[1].flatten()[top_quiet].all())
    # when every layer already clears its floor, nothing changes
    even = [torch.rand(3, 100, generator=gen) for _ in range(3)]
    assert all(
        bool((a == b).all()) for a, b in zip(select(even, 0.5, "floored"), select(even, 0.5, "global"), strict=True)
    )


def test_uniform_budget_keeps_the_same_count_per_head() -> None:
    scores = [torch.rand(3, 40) for _ in range(2)]
    masks = select(scores, ratio=0.75, budget="uniform")
    assert all(int(m.sum(dim=-1).eq(kept_count(40, 0.75)).all()) for m in masks)


def test_streaming_keeps_sinks_and_recent_window() -> None:
    loaded = tiny_model("llama")
    run = prefill_context(loaded, sample_text(100))
    masks = StreamingLLMPress(compression_ratio=0.8, n_sink=4).keep_masks(run)
    keep = kept_count(run.doc_length, 0.8)
    expected = torch.zeros(run.doc_length, dtype=torch.bool)
    expected[:4] = True
    expected[run.doc_length - (keep - 4) :] = True
    for mask in masks:
        assert (mask == expected).all()


def test_compression_drops_pairs_physically_and_decodes() -> None:
    loaded = tiny_model("qwen3", seed=3)
    document = sample_text(400, seed=5)
    full = CompressedCache(compress(loaded, document, KVzipPress(compression_ratio=0.0)))
    compressed = compress(loaded, document, KVzipPress(compression_ratio=0.75))
    doc_pairs = (compressed.original_length - compressed.prefix_length) * compressed.kv_heads * len(compressed.layers)
    prefix_pairs = compressed.prefix_length * compressed.kv_heads * len(compressed.layers)
    assert compressed.kept_pairs == prefix_pairs + kept_count(doc_pairs, 0.75)
    cache = CompressedCache(compressed)
    kept_fraction = compressed.kept_pairs / compressed.total_pairs
    assert abs(cache.nbytes / full.nbytes - kept_fraction) < 1e-6  # memory shrinks in proportion
    assert all(int(layer.positions.max()) < compressed.original_length for layer in compressed.layers)
    lengths = torch.stack([layer.lengths for layer in compressed.layers])
    assert lengths.unique().numel() > 1  # the global budget gives heads different lengths
    answers = answer_many(loaded, cache, ["the vault", "users"], GenerationOptions(max_new_tokens=6))
    assert len(answers) == 2 and cache.get_seq_length() == compressed.original_length


def test_template_prefix_is_never_evicted() -> None:
    loaded = tiny_model("llama", seed=4)
    run = prefill_context(loaded, sample_text(200))
    masks = KVzipPress(compression_ratio=0.9).keep_masks(run)
    compressed = pack(run, masks)
    for layer in compressed.layers:
        for head_positions in layer.positions.split(layer.lengths.tolist()):
            assert head_positions[: run.prefix_length].tolist() == list(range(run.prefix_length))
