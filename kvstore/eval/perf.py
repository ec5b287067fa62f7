"""Cost of every stage for a sweep of context lengths: the figures `kvstore bench` prints.

Per length: prefill, scoring, pack+write, blob bytes, load, time to first answer token (stored
context vs prefilling the document again), decode tokens/s with the full vs the compressed cache,
and the KV bytes each holds in memory. Plus questions/s of `ask_many` at several batch sizes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from kvstore.compress import cut, pack
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many, decode_tokens
from kvstore.engine.models import LoadedModel
from kvstore.engine.prefill import prefill
from kvstore.presses import parse_press_spec
from kvstore.presses.base import prefill_context
from kvstore.storage.store import ContextMeta, ContextStore

QUESTION = "What is the main point of the text?"


@dataclass
class PerfRow:
    context_tokens: int
    prefill_s: float
    score_s: float
    write_s: float
    blob_bytes: int
    full_kv_bytes: int
    load_s: float
    ttft_stored_s: float
    ttft_reprefill_s: float
    decode_tps_full: float
    decode_tps_compressed: float
    kv_bytes_full: int
    kv_bytes_compressed: int
    peak_rss_mb: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class ThroughputRow:
    questions: int
    seconds: float
    questions_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(loaded: LoadedModel, fn: Callable[[], object]) -> tuple[object, float]:
    _sync(loaded.device)
    start = time.perf_counter()
    result = fn()
    _sync(loaded.device)
    return result, time.perf_counter() - start


def _first_token(loaded: LoadedModel, cache: CompressedCache, question_ids: list[int]) -> None:
    next(iter(decode_tokens(loaded, cache, [question_ids], {-1}, GenerationOptions(max_new_tokens=1))))


@torch.inference_mode()
def _reprefill_first_token(loaded: LoadedModel, context_ids: torch.Tensor, question_ids: list[int]) -> None:
    """What a system without a stored prefix does: the whole document and the question, then one token."""
    full = torch.cat([context_ids, torch.tensor([question_ids])], dim=1)
    cache = prefill(loaded.model, full[:, :-1])
    loaded.model(input_ids=full[:, -1:].to(loaded.device), cache=cache, logits_to_keep=1)


def _decode_rate(loaded: LoadedModel, cache: CompressedCache, question_ids: list[int], tokens: int) -> float:
    steps, seconds = _timed(
        loaded,
        lambda: sum(
            1 for _ in decode_tokens(loaded, cache, [question_ids], {-1}, GenerationOptions(max_new_tokens=tokens))
        ),
    )
    return steps / seconds


def measure_length(
    loaded: LoadedModel,
    store: ContextStore,
    document: str,
    press_spec: str,
    ratio: float,
    quant: str,
    kernel: str = "auto",
    decode_tokens: int = 32,
) -> PerfRow:
    """Every stage once for one document (run a warm-up length first to exclude one-time costs)."""
    frame = loaded.frame
    question_ids = frame.question_ids(QUESTION)
    press = parse_press_spec(press_spec, ratio)
    run, prefill_s = _timed(loaded, lambda: prefill_context(loaded, document, press))

    packed, score_s = _timed(loaded, lambda: cut(run, press))
    meta = ContextMeta.for_model(loaded, press.params(), source="bench")
    (record, _), write_s = _timed(loaded, lambda: store.put(packed, meta, quant=quant))
    full = CompressedCache(pack(run, run.keep_all()), device=loaded.device, kernel=kernel)
    compressed, load_s = _timed(
        loaded,
        lambda: CompressedCache.from_store(store, record.id, loaded, kernel),
    )
    _, first_stored = _timed(loaded, lambda: _first_token(loaded, compressed, question_ids))
    _, first_again = _timed(loaded, lambda: _reprefill_first_token(loaded, frame.context_ids(document), question_ids))
    return PerfRow(
        context_tokens=full.original_length,
        prefill_s=prefill_s,
        score_s=score_s,
        write_s=write_s,
        blob_bytes=record.bytes,
        full_kv_bytes=record.full_bytes,
        load_s=load_s,
        ttft_stored_s=load_s + first_stored,
        ttft_reprefill_s=first_again,
        decode_tps_full=_decode_rate(loaded, full, question_ids, decode_tokens),
        decode_tps_compressed=_decode_rate(loaded, compressed, question_ids, decode_tokens),
        kv_bytes_full=full.nbytes,
        kv_bytes_compressed=compressed.nbytes,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def measure_throughput(
    loaded: LoadedModel,
    cache: CompressedCache,
    questions: Sequence[str],
    batch_sizes: Sequence[int],
    max_new_tokens: int = 16,
) -> list[ThroughputRow]:
    """Questions/s of ask_many against one stored prefix, at each batch size."""
    rows = []
    for size in batch_sizes:
        batch = [questions[i % len(questions)] for i in range(size)]
        _, seconds = _timed(
            loaded,
            lambda batch=batch: answer_many(loaded, cache, batch, GenerationOptions(max_new_tokens=max_new_tokens)),
        )
        rows.append(ThroughputRow(size, seconds, size / seconds))
    return rows
