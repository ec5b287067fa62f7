"""Run samples through compress -> store -> load -> ask, for several presses and ratios.

The protocol is question-agnostic: each context is compressed, written to the store and loaded
back before its question is seen, exactly as a user of the store experiences it. One scoring pass
per (sample, press) serves every ratio, and the full cache is always measured as the reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from kvstore.compress import cut
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.models import LoadedModel
from kvstore.eval.tasks import Sample
from kvstore.presses import parse_press_spec
from kvstore.presses.base import Press, ScoringInput, TokenPress, prefill_context
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextMeta, ContextStore

FULL = "full"


@dataclass
class CaseResult:
    """One (sample, press, ratio) outcome; `method` is "full" for the uncompressed reference."""

    sample_id: str
    task: str
    family: str
    method: str
    ratio: float
    quant: str
    score: float
    answer: str
    expected: list[str]
    context_tokens: int
    achieved_ratio: float
    stored_bytes: int
    full_bytes: int
    prefill_s: float
    score_s: float
    answer_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Scored:
    """A prefilled sample with one press's scores, ready to be cut at any ratio."""

    run: ScoringInput
    scores: list[torch.Tensor] | None
    prefill_s: float
    score_s: float


def _reusable_scores(press: Press) -> bool:
    """One token press scores once for every ratio; chains and channel presses redo their own work."""
    return press.compression_ratio > 0.0 and isinstance(press, TokenPress)


def _score_once(loaded: LoadedModel, sample: Sample, spec: str, ratio: float) -> _Scored:
    press = parse_press_spec(spec, ratio)
    start = time.perf_counter()
    run = prefill_context(loaded, sample.context, press)
    prefill_s = time.perf_counter() - start
    if not _reusable_scores(press):
        return _Scored(run, None, prefill_s, 0.0)
    start = time.perf_counter()
    scores = press.score(run)
    return _Scored(run, scores, prefill_s, time.perf_counter() - start)


def _ask_stored(
    loaded: LoadedModel,
    store: ContextStore,
    sample: Sample,
    scored: _Scored,
    spec: str,
    ratio: float,
    quant: str,
    max_new_tokens: int,
) -> tuple[str, float, float, ContextRecord]:
    """Cut at `ratio`, store, load back, then (only then) ask.

    Returns (answer, answer seconds, cut seconds, stored record); cutting is the keep masks, key
    channels and packing, which for chains and channel presses includes all of their scoring.
    """
    press = parse_press_spec(spec, ratio)
    start = time.perf_counter()
    compressed = cut(scored.run, press, scored.scores)
    cut_s = time.perf_counter() - start
    record, _ = store.put(compressed, ContextMeta.for_model(loaded, press.params(), source=sample.id), quant=quant)
    cache = CompressedCache(store.load(record.id, model_fingerprint=loaded.fingerprint), device=loaded.device)
    start = time.perf_counter()
    answer = str(answer_many(loaded, cache, [sample.question], GenerationOptions(max_new_tokens=max_new_tokens))[0])
    return answer, time.perf_counter() - start, cut_s, record


def evaluate(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    presses: Sequence[str],
    ratios: Sequence[float],
    store: ContextStore,
    quant: str = "none",
    max_new_tokens: int = 32,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Every sample under the full cache and under each press spec at each ratio.

    A spec's stages without a ratio take the swept one: "kvzip+think:0.25" at 0.75 is kvzip:0.75+think:0.25.
    """
    compressed_ratios = [r for r in ratios if r > 0.0]
    plan = [(FULL, "none", [0.0])] + [(spec, spec, compressed_ratios) for spec in presses if compressed_ratios]
    results = []
    for sample in samples:
        for label, spec, press_ratios in plan:
            scored = _score_once(loaded, sample, spec, press_ratios[0])
            for ratio in press_ratios:
                answer, answer_s, cut_s, record = _ask_stored(
                    loaded, store, sample, scored, spec, ratio, quant, max_new_tokens
                )
                result = CaseResult(
                    sample.id,
                    sample.task,
                    sample.family,
                    label,
                    ratio,
                    quant,
                    sample.score(answer),
                    answer,
                    list(sample.answers),
                    scored.run.length,
                    record.ratio_achieved,
                    record.bytes,
                    record.full_bytes,
                    scored.prefill_s,
                    0.0 if label == FULL else scored.score_s + cut_s,
                    answer_s,
                )
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results
