"""Press chains (the kept fraction multiplies) and the press spec parser."""

from __future__ import annotations

import json

import pytest
import torch

from kvstore.compress import compress
from kvstore.presses import (
    H2OPress,
    KVzipPress,
    NoPress,
    PressChain,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    parse_press_spec,
    press_spec,
)
from kvstore.presses import watch as watch_module
from kvstore.presses.base import prefill_context
from kvstore.presses.budget import LAYER_FLOOR, kept_count, select_among
from kvstore.presses.chain import FanOut
from tests.tiny import sample_text, tiny_model


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", seed=5)


def _doc_pairs(masks) -> int:
    return sum(int(m.sum()) for m in masks)


def test_select_among_only_keeps_survivors() -> None:
    scores = [torch.tensor([[9.0, 8.0, 1.0, 2.0], [7.0, 0.0, 3.0, 4.0]])]
    alive = [torch.tensor([[False, True, True, True], [False, False, True, True]])]
    kept = select_among(scores, 0.5, "global", alive)  # 5 alive -> keep 2 (round(2.5) = 2)
    assert kept[0].tolist() == [[False, True, False, False], [False, False, False, True]]
    per_head = select_among(scores, 0.5, "uniform", alive)  # 3 alive -> 2, 2 alive -> 1
    assert per_head[0].tolist() == [[False, True, False, True], [False, False, False, True]]
    with pytest.raises(ValueError, match="survivors"):
        select_among(scores, 0.5, "pyramid", alive)


def test_floored_selection_among_survivors_keeps_each_layers_floor() -> None:
    # layer 1's survivors all score below layer 0's: a plain global cut leaves it nothing
    scores = [torch.arange(200.0, 400.0).view(2, 100), torch.arange(0.0, 200.0).view(2, 100)]
    alive = [torch.rand(2, 100, generator=torch.Generator().manual_seed(s)) > 0.3 for s in (1, 2)]
    n_alive = [int(a.sum()) for a in alive]
    kept = select_among(scores, 0.75, "floored", alive)
    assert all(not bool((k & ~a).any()) for k, a in zip(kept, alive, strict=True))  # only survivors
    assert _doc_pairs(kept) == kept_count(sum(n_alive), 0.75)
    assert int(kept[1].sum()) == int(LAYER_FLOOR * kept_count(n_alive[1], 0.75)) > 0
    assert int(select_among(scores, 0.75, "global", alive)[1].sum()) == 0


def test_chain_kept_fraction_is_the_product(loaded) -> None:
    run = prefill_context(loaded, sample_text(160, seed=1))
    first = KVzipPress(compression_ratio=0.5)
    chain = PressChain(stages=(first, H2OPress(compression_ratio=0.5, budget="global")))
    assert chain.compression_ratio == 0.75
    masks = chain.keep_masks(run)
    total = sum(m.numel() for m in masks)
    assert _doc_pairs(masks) == kept_count(kept_count(total, 0.5), 0.5)
    assert abs(_doc_pairs(masks) / total - 0.25) < 2 / total
    alive = first.keep_masks(run)
    assert all(bool((m <= a).all()) for m, a in zip(masks, alive, strict=True))  # only survivors are kept
    per_head = PressChain(stages=(first, StreamingLLMPress(compression_ratio=0.5))).keep_masks(run)
    for mask, survivors in zip(per_head, alive, strict=True):
        assert mask.sum(-1).tolist() == [kept_count(int(n), 0.5) for n in survivors.sum(-1)]


def test_chain_of_observer_presses_shares_one_prefill(loaded, monkeypatch) -> None:
    chain = parse_press_spec("h2o:0.5+snapkv:0.5")
    run = prefill_context(loaded, sample_text(120, seed=2), chain)
    assert isinstance(run.prefill_observer, FanOut) and len(run.prefill_observer.observers) == 2

    def no_replay(*args, **kwargs):
        raise AssertionError("the stages should use what they watched during the prefill")

    monkeypatch.setattr(watch_module, "prefill", no_replay)
    masks = chain.keep_masks(run)
    assert _doc_pairs(masks) == sum(
        kept_count(kept_count(run.doc_length, 0.5), 0.5) * m.shape[0] for m in masks
    )  # uniform stages: per head (1 - r1)(1 - r2), with each stage's rounding


def test_chain_compresses_and_records_its_stages(loaded) -> None:
    chain = parse_press_spec("kvzip:0.75+streaming:0.5")
    compressed = compress(loaded, sample_text(120, seed=3), chain)
    layers, heads = len(compressed.layers), compressed.kv_heads
    doc_total = (compressed.original_length - compressed.prefix_length) * layers * heads
    kept_doc = compressed.kept_pairs - compressed.prefix_length * layers * heads
    assert abs(kept_doc / doc_total - 0.125) < 0.02
    params = json.loads(json.dumps(chain.params()))
    assert params["press"] == "chain" and params["compression_ratio"] == 0.875
    assert [s["press"] for s in params["stages"]] == ["kvzip", "streaming"]
    assert press_spec(chain) == "kvzip:0.75+streaming:0.5"


def test_chain_rejects_structured_later_stages_but_skips_empty_ones() -> None:
    with pytest.raises(ValueError, match="put it first"):
        PressChain(stages=(KVzipPress(compression_ratio=0.5), PyramidKVPress(compression_ratio=0.5)))
    chain = PressChain(stages=(NoPress(), PyramidKVPress(compression_ratio=0.5)))
    assert chain.compression_ratio == 0.5
    with pytest.raises(ValueError, match="at least one"):
        PressChain(stages=())


def test_spec_parser_builds_presses_and_chains() -> None:
    single = parse_press_spec("kvzip:0.75")
    assert isinstance(single, KVzipPress) and single.compression_ratio == 0.75
    chain = parse_press_spec(" SnapKV:0.5 + streaming:0.25 ")
    assert isinstance(chain, PressChain)
    assert [type(s) for s in chain.stages] == [SnapKVPress, StreamingLLMPress]
    assert chain.compression_ratio == pytest.approx(1 - 0.5 * 0.75)
    assert isinstance(parse_press_spec("kvzip:0"), NoPress) and isinstance(parse_press_spec("none"), NoPress)
    assert parse_press_spec("tova", default_ratio=0.5).compression_ratio == 0.5


def test_spec_budget_suffix_overrides_the_press_default_and_round_trips() -> None:
    assert parse_press_spec("kvzip:0.9").budget == "floored"  # KVzip's default
    plain = parse_press_spec("kvzip@global:0.9")
    assert isinstance(plain, KVzipPress) and plain.budget == "global" and plain.compression_ratio == 0.9
    assert press_spec(plain) == "kvzip@global:0.9" and press_spec(parse_press_spec("kvzip:0.9")) == "kvzip:0.9"
    chain = parse_press_spec("kvzip@uniform:0.5+streaming:0.5")
    assert chain.stages[0].budget == "uniform" and press_spec(chain) == "kvzip@uniform:0.5+streaming:0.5"
    assert parse_press_spec("snapkv@floored", default_ratio=0.5).budget == "floored"
    heads = parse_press_spec("kvzip_head@heads:0.5")  # each press names the budgets it accepts
    assert heads.budget == "heads" and press_spec(heads) == "kvzip_head:0.5"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo:0.5", "unknown press 'foo'"),
        ("kvzip:1.0", "bad ratio '1.0'"),
        ("kvzip:-0.1", "bad ratio '-0.1'"),
        ("kvzip:abc", "bad ratio 'abc'"),
        ("kvzip:nan", "bad ratio 'nan'"),
        ("kvzip", "needs a ratio"),
        ("kvzip:0.5+", "empty press name"),
        ("", "empty press spec"),
        ("none:0.5", "keeps everything"),
        ("kvzip:0.5+pyramidkv:0.5", "put it first"),
        ("kvzip@nope:0.5", "unknown budget 'nope'"),
        ("pyramidkv@global:0.5", "unknown budget 'global' for pyramidkv"),
        ("kvzip_head@global:0.5", "choose one of heads"),
        ("kvzip:0.5+think@global:0.25", "unknown budget 'global' for think"),
    ],
)
def test_spec_parser_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_press_spec(spec)
