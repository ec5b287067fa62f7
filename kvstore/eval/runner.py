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
from kvstore.decode.blend import blend, later_segments_start
from kvstore.decode.cache import CompressedCache
from kvstore.decode.compose import compose
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.models import LoadedModel
from kvstore.eval.tasks import Sample
from kvstore.kv.compressed import CompressedKV
from kvstore.presses import parse_press_spec
from kvstore.presses.base import Press, ScoringInput, TokenPress, prefill_context
from kvstore.search import rank_texts
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextMeta, ContextStore
from kvstore.text.parts import split_tokens
from kvstore.text.prompt import encode

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
    """A prefilled document with one press's scores, ready to be cut at any ratio."""

    run: ScoringInput
    scores: list[torch.Tensor] | None
    prefill_s: float
    score_s: float


@dataclass
class _Stored:
    """One document cut at a ratio, written to the store and loaded back (question not seen yet)."""

    compressed: CompressedKV
    record: ContextRecord
    cut_s: float


def _reusable_scores(press: Press) -> bool:
    """One token press scores once for every ratio; chains and channel presses redo their own work."""
    return press.compression_ratio > 0.0 and isinstance(press, TokenPress)


def _score_once(loaded: LoadedModel, document: str | list[int], spec: str, ratio: float) -> _Scored:
    press = parse_press_spec(spec, ratio)
    start = time.perf_counter()
    run = prefill_context(loaded, document, press)
    prefill_s = time.perf_counter() - start
    if not _reusable_scores(press):
        return _Scored(run, None, prefill_s, 0.0)
    start = time.perf_counter()
    scores = press.score(run)
    return _Scored(run, scores, prefill_s, time.perf_counter() - start)


def _store_cut(
    loaded: LoadedModel, store: ContextStore, scored: _Scored, spec: str, ratio: float, quant: str, source: str
) -> _Stored:
    """Cut at `ratio`, store, load back. Cutting is the keep masks, key channels and packing, which for
    chains and channel presses includes all of their scoring."""
    press = parse_press_spec(spec, ratio)
    start = time.perf_counter()
    compressed = cut(scored.run, press, scored.scores)
    cut_s = time.perf_counter() - start
    record, _ = store.put(compressed, ContextMeta.for_model(loaded, press.params(), source=source), quant=quant)
    return _Stored(store.load(record.id, loaded.fingerprint, loaded.kv_shape), record, cut_s)


def _answer(loaded: LoadedModel, compressed: CompressedKV, question: str, max_new_tokens: int) -> tuple[str, float]:
    cache = CompressedCache.for_model(compressed, loaded)
    start = time.perf_counter()
    answer = answer_many(loaded, cache, [question], GenerationOptions(max_new_tokens=max_new_tokens))[0]
    return str(answer), time.perf_counter() - start


def documents_of(loaded: LoadedModel, sample: Sample) -> list[str | list[int]]:
    """What a multi-document sample stores separately: its documents, or a long document's parts as
    ingest cuts them (token ids); empty for single-context samples."""
    if sample.documents:
        return list(sample.documents)
    parts = int(sample.meta.get("parts", 0))
    if not parts:
        return []
    tokens = len(encode(loaded.tokenizer, sample.context))
    return [part.ids for part in split_tokens(sample.context, loaded.tokenizer, -(-tokens // parts) + 16)]


def _text(loaded: LoadedModel, document: str | list[int]) -> str:
    return document if isinstance(document, str) else loaded.tokenizer.decode(document)


@dataclass
class _Outcome:
    """One answer and what it cost, before it is scored against its sample."""

    method: str
    ratio: float
    answer: str
    context_tokens: int
    achieved_ratio: float
    stored_bytes: int
    full_bytes: int
    prefill_s: float
    score_s: float
    answer_s: float

    def result(self, sample: Sample, quant: str) -> CaseResult:
        return CaseResult(
            sample.id,
            sample.task,
            sample.family,
            self.method,
            self.ratio,
            quant,
            sample.score(self.answer),
            self.answer,
            list(sample.answers),
            self.context_tokens,
            self.achieved_ratio,
            self.stored_bytes,
            self.full_bytes,
            self.prefill_s,
            self.score_s,
            self.answer_s,
        )


def _document_outcomes(
    loaded: LoadedModel,
    sample: Sample,
    label: str,
    ratio: float,
    parts: list[_Scored],
    pieces: list[_Stored],
    best: int,
    max_new_tokens: int,
    blend_fraction: float,
) -> list[_Outcome]:
    """A multi-document sample answered from its documents stored apart: composed (and blended), and
    from the single best document alone."""
    scoring = label != FULL
    score_s = sum(p.score_s for p in parts) + sum(s.cut_s for s in pieces) if scoring else 0.0
    stored, full = sum(s.record.bytes for s in pieces), sum(s.record.full_bytes for s in pieces)
    prefill_s = sum(p.prefill_s for p in parts)
    segments = [s.compressed for s in pieces]
    composed = compose(loaded, segments, max_new_tokens)
    variants = [("composed", composed, 0.0)]
    if blend_fraction > 0.0:
        start = time.perf_counter()
        blended, _ = blend(loaded, composed, later_segments_start(segments), blend_fraction)
        variants.append(("blended", blended, time.perf_counter() - start))
    outcomes = []
    for name, context, blend_s in variants:
        answer, answer_s = _answer(loaded, context, sample.question, max_new_tokens)
        ratio_achieved = context.achieved_ratio
        outcomes.append(
            _Outcome(f"{label} {name}", ratio, answer, context.original_length, ratio_achieved, stored, full,
                     prefill_s, score_s + blend_s, answer_s)
        )  # fmt: skip
    single, scored = pieces[best], parts[best]
    answer, answer_s = _answer(loaded, single.compressed, sample.question, max_new_tokens)
    record = single.record
    single_score_s = scored.score_s + single.cut_s if scoring else 0.0
    outcomes.append(
        _Outcome(f"{label} single", ratio, answer, record.original_length, record.ratio_achieved, record.bytes,
                 record.full_bytes, scored.prefill_s, single_score_s, answer_s)
    )  # fmt: skip
    return outcomes


def evaluate(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    presses: Sequence[str],
    ratios: Sequence[float],
    store: ContextStore,
    quant: str = "none",
    max_new_tokens: int = 32,
    on_result: Callable[[CaseResult], None] | None = None,
    blend_fraction: float = 0.0,
) -> list[CaseResult]:
    """Every sample under the full cache and under each press spec at each ratio.

    A spec's stages without a ratio take the swept one: "kvzip+think:0.25" at 0.75 is kvzip:0.75+think:0.25.
    A multi-document sample is also answered from its documents stored separately: composed into
    one prompt (method "<press> composed"; "<press> blended" with `blend_fraction` > 0) and from the
    single best document by BM25 ("<press> single"); the plain method is the joint prefill.
    """
    compressed_ratios = [r for r in ratios if r > 0.0]
    plan = [(FULL, "none", [0.0])] + [(spec, spec, compressed_ratios) for spec in presses if compressed_ratios]
    results = []
    for sample in samples:
        documents = documents_of(loaded, sample)
        best = rank_texts([_text(loaded, d) for d in documents], sample.question, 1)[0][0] if documents else 0
        for label, spec, press_ratios in plan:
            scored = _score_once(loaded, sample.context, spec, press_ratios[0])
            parts = [_score_once(loaded, d, spec, press_ratios[0]) for d in documents]
            for ratio in press_ratios:
                stored = _store_cut(loaded, store, scored, spec, ratio, quant, sample.id)
                answer, answer_s = _answer(loaded, stored.compressed, sample.question, max_new_tokens)
                record = stored.record
                score_s = 0.0 if label == FULL else scored.score_s + stored.cut_s
                outcomes = [
                    _Outcome(label, ratio, answer, scored.run.length, record.ratio_achieved, record.bytes,
                             record.full_bytes, scored.prefill_s, score_s, answer_s)
                ]  # fmt: skip
                if documents:
                    pieces = [_store_cut(loaded, store, p, spec, ratio, quant, sample.id) for p in parts]
                    outcomes += _document_outcomes(
                        loaded, sample, label, ratio, parts, pieces, best, max_new_tokens, blend_fraction
                    )
                for outcome in outcomes:
                    results.append(outcome.result(sample, quant))
                    if on_result is not None:
                        on_result(results[-1])
    return results
