"""ThinK: the channel rule on hand-made patterns, exact ragged attention, real savings, blobs and specs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvstore.compress import compress, pack
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.prefix import RaggedPrefix
from kvstore.engine.attention import observing
from kvstore.engine.prefill import prefill
from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.kv.quant import KEYS_AXIS, VALUES_AXIS, bits_for, quantize
from kvstore.presses import NoPress, PressChain, ThinKPress, make_press, parse_press_spec, press_spec
from kvstore.presses import watch as watch_module
from kvstore.presses.base import ChannelPress, TokenPress, prefill_context
from kvstore.presses.budget import kept_count
from kvstore.presses.chain import FanOut
from kvstore.presses.think import QueryWindow, channel_scores, top_channels
from kvstore.storage.blob import BlobHeader
from kvstore.storage.formats import FORMATS
from kvstore.storage.index import ContextIndex
from kvstore.storage.payload import checksum, payload
from kvstore.storage.store import ContextMeta, ContextStore
from tests.factories import half_step, load_blob, save_blob
from tests.tiny import sample_text, tiny_model


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", seed=11)  # head_dim 16, 2 KV heads, GQA groups of 2


# -- the rule ------------------------------------------------------------------------------------


def test_kept_channels_follow_query_norm_times_key_norm_of_kept_doc_rows() -> None:
    prefix, doc, dim = 2, 4, 8
    q_norms = torch.tensor([[1.0, 9, 1, 1, 4, 1, 1, 1], [1.0] * 8])
    k_norms = torch.tensor([[8.0, 1, 1, 1, 1, 1, 3, 1], [1.0, 2, 3, 4, 5, 6, 7, 8]])
    keys = torch.zeros(1, 2, prefix + doc, dim)
    keys[0, :, prefix] = k_norms  # one kept document row carries the whole norm
    keys[0, :, prefix + 3, 2] = 1000.0  # an evicted row: must not count
    keys[0, :, :prefix, 3] = 1000.0  # template prefix rows: must not count either
    doc_keep = [torch.tensor([[True, True, True, False], [True, False, True, False]])]
    window = QueryWindow(length=prefix + doc, first_query=prefix + doc - 2)
    squares = torch.zeros(4, dim)  # query heads 0, 1 -> KV head 0; 2, 3 -> KV head 1
    squares[0], squares[1] = q_norms[0].square() * 0.25, q_norms[0].square() * 0.75
    squares[2], squares[3] = q_norms[1].square(), 0.0
    window.squares[0] = squares
    run = SimpleNamespace(
        cache=SimpleNamespace(layers=[SimpleNamespace(keys=keys)]),
        prefix_length=prefix,
        length=prefix + doc,
        prefill_observer=window,
    )
    torch.testing.assert_close(window.norms(0, 2), q_norms)
    torch.testing.assert_close(channel_scores(q_norms, keys[0, :, prefix:], doc_keep[0]), q_norms * k_norms)
    channels = ThinKPress(compression_ratio=0.5, window_size=2).key_channels(run, doc_keep)
    assert channels[0].dtype == torch.int32
    assert channels[0].tolist() == [[0, 1, 4, 6], [4, 5, 6, 7]]
    assert top_channels(torch.tensor([[1.0, 2, 2, 2, 0]]), 2).tolist() == [[1, 2]]  # ties: lower channels first
    assert ThinKPress(compression_ratio=0.0).key_channels(run, doc_keep) is None


def test_query_window_over_chunked_prefill_sums_the_last_rows(loaded) -> None:
    run = prefill_context(loaded, sample_text(60, seed=1))
    press = ThinKPress(compression_ratio=0.25, window_size=9)
    observer = press.watch_prefill(run.prefix_length, run.length)
    assert observer.first_query == run.length - 9
    with observing(observer):
        prefill(loaded.model, run.input_ids, chunk_size=run.length - 4)  # the window split across two chunks
    seen = {}

    class Recorder:
        def observe(self, layer_idx, query, key, value, scaling):
            seen[layer_idx] = query[0].clone()

    with torch.no_grad(), observing(Recorder()):
        loaded.model(run.input_ids)
    for layer, query in seen.items():
        torch.testing.assert_close(observer.squares[layer], query[:, -9:].square().sum(1), atol=1e-5, rtol=1e-5)


# -- exact attention over pruned keys ------------------------------------------------------------


def _zeroed_reference(query, keys, values, channels, suffix_keys, suffix_values, suffix_mask, scaling):
    """Dense float64: full-width prefix keys and that head's query with the pruned channels zeroed, prefix only."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = len(keys)
    groups = q_heads // kv_heads
    out = torch.empty(batch, q_heads, q_len, dim, dtype=torch.float64)
    for h in range(kv_heads):
        kept = torch.zeros(dim, dtype=torch.float64)
        kept[channels[h]] = 1.0
        full_keys = torch.zeros(keys[h].shape[0], dim, dtype=torch.float64)
        full_keys[:, channels[h]] = keys[h].double()
        q = query[:, h * groups : (h + 1) * groups].double()
        prefix_scores = (q * kept) @ full_keys.T
        suffix_scores = (q @ suffix_keys[:, h, None].double().transpose(-1, -2)).masked_fill(~suffix_mask, -math.inf)
        probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], -1) * scaling, dim=-1)
        out[:, h * groups : (h + 1) * groups] = probs @ torch.cat(
            [values[h].double().expand(batch, 1, -1, -1), suffix_values[:, h, None].double()], dim=2
        )
    return out.transpose(1, 2)


@pytest.mark.parametrize("seed", range(3))
def test_ragged_attention_with_pruned_channels_equals_zeroed_dense_reference(seed: int, monkeypatch) -> None:
    import kvstore.decode.kernels.loop as attention

    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, groups, q_len, s_len, dim, kept = 2, 3, 2, 4, 6, 16, 11
    lengths = torch.randint(1, 30, (kv_heads,), generator=gen).tolist()
    channels = [torch.randperm(dim, generator=gen)[:kept].sort().values for _ in range(kv_heads)]
    keys = [torch.randn(n, kept, generator=gen) for n in lengths]
    values = [torch.randn(n, dim, generator=gen) for n in lengths]
    suffix_keys = torch.randn(batch, kv_heads, s_len, dim, generator=gen)
    suffix_values = torch.randn(batch, kv_heads, s_len, dim, generator=gen)
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=gen)
    mask = torch.ones(q_len, s_len, dtype=torch.bool).tril(diagonal=s_len - q_len)[None, None].repeat(batch, 1, 1, 1)
    mask[1, :, :, :2] = False  # row 1 left-padded
    prefix = RaggedPrefix.from_heads(keys, values, channels)
    ours = ragged_attention(query, prefix, suffix_keys, suffix_values, mask, 0.25)
    expected = _zeroed_reference(query, keys, values, channels, suffix_keys, suffix_values, mask, 0.25)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", 40)  # row blocks give the same result
    torch.testing.assert_close(ragged_attention(query, prefix, suffix_keys, suffix_values, mask, 0.25), ours)
    full_keys = [torch.randn(n, dim, generator=gen) for n in lengths]
    everything = [torch.arange(dim)] * kv_heads  # keeping every channel is the unpruned attention
    torch.testing.assert_close(
        ragged_attention(
            query, RaggedPrefix.from_heads(full_keys, values, everything), suffix_keys, suffix_values, mask, 0.25
        ),
        ragged_attention(query, RaggedPrefix.from_heads(full_keys, values), suffix_keys, suffix_values, mask, 0.25),
    )


# -- compression on a tiny model -----------------------------------------------------------------


def test_think_alone_keeps_every_pair_and_prunes_the_same_count_per_head() -> None:
    loaded = tiny_model("qwen3", seed=3)
    press = parse_press_spec("think:0.25")
    compressed = compress(loaded, sample_text(120, seed=4), press)
    assert compressed.kept_pairs == compressed.total_pairs  # no token evicted
    for layer in compressed.layers:
        assert layer.key_channels.shape == (compressed.kv_heads, 12) and layer.keys.shape[1] == 12
        assert all(row.unique().numel() == 12 and bool((row.diff() > 0).all()) for row in layer.key_channels)
        assert layer.values.shape[1] == 16
    assert compressed.achieved_ratio == pytest.approx(0.125)
    assert press.memory_ratio == 0.125 and press.params()["memory_ratio"] == 0.125
    answers = answer_many(
        loaded, CompressedCache(compressed), ["the vault", "users"], GenerationOptions(max_new_tokens=4)
    )
    assert len(answers) == 2
    assert isinstance(press, ChannelPress) and not isinstance(press, TokenPress)  # it has no token score at all


def test_think_ratio_zero_changes_nothing(loaded) -> None:
    document = sample_text(80, seed=2)
    assert isinstance(make_press("think", 0.0), NoPress)
    plain = compress(loaded, document, NoPress())
    zero = compress(loaded, document, ThinKPress(compression_ratio=0.0))
    for a, b in zip(plain.layers, zero.layers, strict=True):
        assert b.key_channels is None and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert zero.achieved_ratio == 0.0


def test_kvzip_then_think_saves_the_expected_fraction_and_decodes(loaded) -> None:
    document = sample_text(160, seed=3)
    chain = parse_press_spec("kvzip:0.5+think:0.25")
    assert chain.compression_ratio == pytest.approx(1 - 0.5 * 0.875)
    run = prefill_context(loaded, document, chain)
    assert isinstance(run.prefill_observer, FanOut)
    masks = chain.keep_masks(run)
    channels = chain.key_channels(run, masks)
    pruned, unpruned = pack(run, masks, channels), pack(run, masks)
    layers, heads, dim, kept = len(pruned.layers), pruned.kv_heads, 16, kept_count(16, 0.25)
    doc_total = run.doc_length * layers * heads
    assert pruned.kept_pairs - run.prefix_length * layers * heads == kept_count(doc_total, 0.5)
    # the cache holds kept pairs x (kept key channels + all value channels), plus the channel indices
    cache, reference = CompressedCache(pruned), CompressedCache(unpruned)
    index_bytes = layers * heads * kept * 8
    assert cache.nbytes == pruned.kept_pairs * (kept + dim) * 4 + index_bytes
    assert reference.nbytes == pruned.kept_pairs * 2 * dim * 4
    assert (cache.nbytes - index_bytes) / reference.nbytes == pytest.approx(1 - 0.25 / 2)
    assert pruned.nbytes - unpruned.nbytes == pruned.kept_pairs * (kept - dim) * 4 + layers * heads * kept * 4
    kept_fraction = pruned.kept_pairs / pruned.total_pairs
    assert pruned.achieved_ratio == pytest.approx(1 - kept_fraction * 0.875)
    stored = compress(loaded, document, chain)  # the same through compress()
    for a, b in zip(stored.layers, pruned.layers, strict=True):
        assert torch.equal(a.key_channels, b.key_channels) and torch.equal(a.keys, b.keys)
    answers = answer_many(loaded, cache, ["the vault", "users"], GenerationOptions(max_new_tokens=4))
    assert len(answers) == 2 and cache.get_seq_length() == pruned.original_length


def test_chain_stages_share_one_prefill(loaded, monkeypatch) -> None:
    chain = parse_press_spec("snapkv:0.5+think:0.5")
    run = prefill_context(loaded, sample_text(90, seed=6), chain)

    def no_replay(*args, **kwargs):
        raise AssertionError("think should use the queries it watched during the prefill")

    monkeypatch.setattr(watch_module, "prefill", no_replay)
    masks = chain.keep_masks(run)
    assert all(c.shape == (2, 8) for c in chain.key_channels(run, masks))


# -- blobs and the store -------------------------------------------------------------------------


def pruned_compressed(seed: int = 0, layers: int = 3, kv_heads: int = 2, dim: int = 16, length: int = 70):
    gen = torch.Generator().manual_seed(seed)
    packed = []
    for i in range(layers):
        keep = torch.rand(kv_heads, length, generator=gen) < 0.6
        keep[:, :4] = True
        keys, values = torch.randn(2, kv_heads, length, dim, generator=gen).unbind(0)
        channels = (
            None if i == 1 else torch.stack([torch.randperm(dim, generator=gen)[:11].sort().values for _ in keep])
        )
        packed.append(CompressedLayer.from_dense(keys, values, keep, channels))
    return CompressedKV(packed, torch.arange(length, dtype=torch.int32), prefix_length=4)


def header(compressed: CompressedKV, quant: str = "none") -> BlobHeader:
    return BlobHeader.describe(
        compressed, model="tiny", model_fingerprint="fp", tokenizer_fingerprint="tok", press={"press": "x"}, quant=quant
    )


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_blob_round_trip_keeps_key_channels(tmp_path: Path, fmt: str, quant: str) -> None:
    compressed = pruned_compressed()
    path = tmp_path / f"ctx{FORMATS[fmt]}"
    written = save_blob(path, compressed, header(compressed, quant))
    assert written.key_channels == [11, 0, 11] and written.head_dim == 16
    back, read = load_blob(path)
    assert read == written
    bits = bits_for(quant)
    for original, loaded_layer in zip(compressed.layers, back.layers, strict=True):
        if original.key_channels is None:
            assert loaded_layer.key_channels is None
        else:
            assert torch.equal(original.key_channels, loaded_layer.key_channels)
        for part, axis in (("keys", KEYS_AXIS), ("values", VALUES_AXIS)):
            x, y = getattr(original, part), getattr(loaded_layer, part)
            assert x.shape == y.shape
            if bits is None:
                assert torch.equal(x, y)
            else:
                bound = half_step(quantize(x, bits, axis, read.group_size, original.lengths))
                assert bool(((x - y).abs() <= bound * (1 + 1e-5) + 1e-6 * x.abs()).all())


def test_key_channels_are_in_the_checksum_and_version_1_blobs_still_read(tmp_path: Path) -> None:
    compressed = pruned_compressed()
    described = header(compressed)
    tensors = payload(compressed, described)
    altered = dict(tensors, **{"layer.0.key_channels": tensors["layer.0.key_channels"].flip(-1).contiguous()})
    assert checksum(described, tensors) != checksum(described, altered)
    assert checksum(described, tensors) != checksum(replace(described, key_channels=[11, 0, 10]), tensors)
    plain = pruned_compressed()
    plain.layers = [
        replace(layer, keys=torch.randn(layer.keys.shape[0], 16), key_channels=None) for layer in plain.layers
    ]
    for suffix in FORMATS.values():  # a blob as version 1 wrote it: no key_channels field at all
        path = tmp_path / f"v1{suffix}"
        written = save_blob(path, plain, replace(header(plain), key_channels=[], format_version=1))
        assert "key_channels" not in written.to_json()
        back, read = load_blob(path)
        assert read.format_version == 1 and all(layer.key_channels is None for layer in back.layers)
        assert torch.equal(back.layers[2].keys, plain.layers[2].keys)


def test_store_records_memory_ratios(tmp_path: Path) -> None:
    compressed = pruned_compressed()
    press = ThinKPress(compression_ratio=0.25).params()
    meta = ContextMeta("tiny", "fp", "tok", press)
    assert meta.requested_ratio == 0.125
    assert ContextMeta("tiny", "fp", "tok", PressChain(stages=(NoPress(),)).params()).requested_ratio == 0.0
    store = ContextStore(tmp_path / "home", ContextIndex.open(None, tmp_path / "home", "kvstore-think-test:"))
    try:
        record, created = store.put(compressed, meta, quant="int8")
        assert created and record.full_bytes == compressed.total_pairs * 16 * 2 * 4
        assert record.ratio_achieved == pytest.approx(compressed.achieved_ratio, abs=1e-6)
        loaded_back = store.load(record.id)
        assert [layer.key_channels is None for layer in loaded_back.layers] == [False, True, False]
    finally:
        store.close()


# -- specs ---------------------------------------------------------------------------------------


def test_specs_with_think() -> None:
    alone = parse_press_spec("think:0.25")
    assert isinstance(alone, ThinKPress) and alone.compression_ratio == 0.25 and alone.window_size == 32
    chain = parse_press_spec("kvzip:0.75+think:0.25")
    assert isinstance(chain, PressChain) and isinstance(chain.stages[-1], ThinKPress)
    assert chain.compression_ratio == pytest.approx(1 - 0.25 * (1 - 0.125))
    assert chain.params()["stages"][-1]["memory_ratio"] == 0.125
    assert press_spec(chain) == "kvzip:0.75+think:0.25"
    assert parse_press_spec("kvzip:0.5+think:0").compression_ratio == 0.5
    with pytest.raises(ValueError, match="put it last"):
        parse_press_spec("think:0.25+kvzip:0.5")
    with pytest.raises(ValueError, match="window_size"):
        ThinKPress(compression_ratio=0.5, window_size=0)
