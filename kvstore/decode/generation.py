"""Decoding one or many questions against a CompressedCache, then back to the prefix.

One step loop serves every caller (batches, streaming, benchmarks): the questions are left-padded
and take positions from the ORIGINAL context length; sampling and stop strings use transformers'
own logits warpers and stopping criteria, configured by `GenerationOptions` (greedy by default).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvstore.decode.answer import Answer
from kvstore.decode.cache import CompressedCache
from kvstore.engine.models import LoadedModel
from kvstore.errors import InputError

DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS_LIMIT = 4096
MAX_STOP_STRINGS = 4
# Longer stop strings cost transformers' StopStringCriteria memory and time in proportion (vocabulary
# x length: ~100 MB and ~1 s at 1,000 characters), on the thread that decodes.
MAX_STOP_LENGTH = 64


@dataclass(frozen=True)
class GenerationOptions:
    """How answers are decoded: greedy unless `temperature` > 0; each value is checked here, once."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    seed: int | None = None  # sampling seed, for reproducible samples

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, list | tuple):
            raise InputError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InputError(
                f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens!r}"
            )
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(
            not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop
        ):
            raise InputError(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} characters"
            )
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 2**63):
            raise InputError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")

    @classmethod
    def from_config(cls, config: GenerationConfig) -> GenerationOptions:
        """Options from a transformers GenerationConfig (the fields kvstore honours; others are refused)."""
        unsupported = sorted(
            set(config.to_diff_dict())
            - {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "stop_strings", "transformers_version"}
        )
        if unsupported:
            raise InputError(f"generation settings not supported on stored contexts: {', '.join(unsupported)}")
        stop = config.stop_strings or ()
        return cls(
            max_new_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=float(config.temperature or 1.0) if config.do_sample else 0.0,
            top_p=float(config.top_p or 1.0),
            top_k=int(config.top_k or 0) if config.do_sample else 0,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, object] | None) -> GenerationOptions:
        """Options from JSON (a queued answer task's): the fields above, `stop` as a string or a list, and
        transformers' `do_sample` (false: greedy; true without a temperature: 1.0). Unknown keys are refused."""
        if raw is not None and not isinstance(raw, Mapping):
            raise InputError(f"generation options must be a JSON object, got {type(raw).__name__}")
        fields = dict(raw or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)} - {"do_sample"})
        if unknown:
            raise InputError(f"unknown generation options: {', '.join(unknown)}")
        if "do_sample" in fields:
            sample = fields.pop("do_sample")
            if not isinstance(sample, bool):
                raise InputError(f"do_sample must be true or false, got {sample!r}")
            fields["temperature"] = (fields.get("temperature") or 1.0) if sample else 0.0
        return cls(**fields)

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled; greedy (temperature 0) answers are the same on every run."""
        return self.temperature > 0.0

    def warpers(self) -> LogitsProcessorList:
        """transformers' own temperature, top-k and top-p warpers (none when greedy): sampling as `generate` does."""
        processors = LogitsProcessorList()
        if self.sampling:
            processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


GREEDY = GenerationOptions()


@dataclass
class Row:
    """One question's decoding state: its tokens so far, and whether and why it finished."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = "length"


def _batch_inputs(question_ids: list[list[int]], pad_id: int, original_length: int):
    """Left-pad the questions; positions continue from the original context length."""
    width = max(len(ids) for ids in question_ids)
    input_ids = torch.full((len(question_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(question_ids), width), dtype=torch.long)
    for row, ids in enumerate(question_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    positions = original_length + (mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, mask, positions


def check_window(loaded: LoadedModel, cache: CompressedCache, question_ids: list[list[int]], max_new: int) -> None:
    """Refuse a question that, with the context and the answer, does not fit the model's window."""
    window = getattr(loaded.model.config, "max_position_embeddings", None)
    longest = max((len(ids) for ids in question_ids), default=0)
    if window is not None and cache.original_length + longest + max_new > window:
        raise InputError(
            f"question too long: context {cache.original_length:,} + question {longest:,} + answer up to "
            f"{max_new:,} tokens exceed the model's window of {window:,} tokens"
        )


@torch.inference_mode()
def decode_tokens(
    loaded: LoadedModel,
    cache: CompressedCache,
    question_ids: list[list[int]],
    stop_ids: set[int],
    options: GenerationOptions = GREEDY,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B]) until all rows stopped; the cache is reset afterwards.

    A finished row keeps yielding the pad id. Stop strings are left to the caller (they span tokens).
    """
    check_window(loaded, cache, question_ids, options.max_new_tokens)
    device = loaded.device
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else next(iter(stop_ids))
    input_ids, suffix_mask, positions = _batch_inputs(question_ids, pad_id, cache.original_length)
    context_mask = torch.ones((len(question_ids), cache.original_length), dtype=torch.long)
    attention_mask = torch.cat([context_mask, suffix_mask], dim=1).to(device)
    input_ids, positions = input_ids.to(device), positions.to(device)
    done = torch.zeros(len(question_ids), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    warpers = options.warpers()
    generator = None
    if options.sampling:
        generator = torch.Generator(device=device)
        generator.manual_seed(options.seed if options.seed is not None else torch.seed())
    history = input_ids
    cache.reset()
    cache.reserve(input_ids.shape[1] + options.max_new_tokens)  # the suffix grows in place, never re-copied
    try:
        for _ in range(options.max_new_tokens):
            logits = (
                loaded.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .float()
            )
            if options.sampling:
                probs = warpers(history, logits).softmax(-1)
                next_ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_ids = logits.argmax(-1)
            next_ids = next_ids.masked_fill(done, pad_id)
            yield next_ids
            done |= torch.isin(next_ids, stops)
            if bool(done.all()):
                break
            input_ids = next_ids[:, None]
            history = torch.cat([history, input_ids], dim=1) if options.sampling else history
            positions = positions[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(question_ids), 1)], dim=1)
    finally:
        cache.reset()


def _trim_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def decode_rows(
    loaded: LoadedModel, cache: CompressedCache, questions: list[str], options: GenerationOptions
) -> Iterator[list[Row]]:
    """Run the step loop, yielding every row's state after each step, until all rows finished.

    A caller may interleave several of these (the HTTP server advances one step of each batch in turn).
    """
    if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
        raise InputError("every question must be a non-empty string")
    frame = loaded.frame
    stop_ids = frame.stop_ids()
    question_ids = [frame.question_ids(q) for q in questions]
    rows = [Row(cache.original_length + len(ids)) for ids in question_ids]
    stop_check = StopStringCriteria(loaded.tokenizer, list(options.stop)) if options.stop else None
    for tokens in decode_tokens(loaded, cache, question_ids, stop_ids, options):
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if row.finished:
                continue
            if token in stop_ids:
                row.finished, row.finish_reason = True, "stop"
                continue
            row.tokens.append(token)
            if stop_check is not None and bool(stop_check(torch.tensor([row.tokens]), None)[0]):
                row.finished, row.finish_reason = True, "stop"
        yield rows
        if all(row.finished for row in rows):
            return


def _text(loaded: LoadedModel, row: Row, options: GenerationOptions) -> tuple[str, bool]:
    return _trim_at_stop(loaded.tokenizer.decode(row.tokens, skip_special_tokens=True), options.stop)


def answer_many(
    loaded: LoadedModel,
    cache: CompressedCache,
    questions: list[str],
    options: GenerationOptions = GREEDY,
    contexts: Sequence[str] = (),
) -> list[Answer]:
    """Decode all questions as one batch against the shared compressed prefix."""
    [rows] = deque(decode_rows(loaded, cache, questions, options), maxlen=1)  # the rows once all finished
    return [finished_answer(loaded, row, options, contexts) for row in rows]


def finished_answer(loaded: LoadedModel, row: Row, options: GenerationOptions, contexts: Sequence[str]) -> Answer:
    """The Answer of a row that finished decoding."""
    text, stopped = _text(loaded, row, options)
    return Answer(text.strip(), contexts, row.prompt_tokens, len(row.tokens), "stop" if stopped else row.finish_reason)


class TextStream:
    """Turns one row's growing tokens into text pieces that join into its final answer.

    Text that could still become a stop string, or an incomplete UTF-8 character, is held back.
    """

    def __init__(self, loaded: LoadedModel, options: GenerationOptions):
        """Holds back one character less than the longest stop string, so no stop string is ever half shown."""
        self.loaded, self.options = loaded, options
        self.hold = max((len(s) - 1 for s in options.stop), default=0)
        self.shown = ""

    def _final(self, row: Row) -> tuple[str, bool]:
        text, stopped = _text(self.loaded, row, self.options)
        return text.strip(), stopped

    def update(self, row: Row) -> str:
        """The new piece after a decoding step (possibly empty)."""
        final, stopped = self._final(row)
        ready = final if stopped or not self.hold else final[: max(0, len(final) - self.hold)]
        return self._advance(ready.rstrip("\ufffd").rstrip())

    def finish(self, row: Row) -> str:
        """Whatever was held back, once the row finished."""
        return self._advance(self._final(row)[0])

    def _advance(self, ready: str) -> str:
        if not ready.startswith(self.shown) or len(ready) <= len(self.shown):
            return ""
        piece, self.shown = ready[len(self.shown) :], ready
        return piece


def stream_answer(
    loaded: LoadedModel,
    cache: CompressedCache,
    question: str,
    options: GenerationOptions = GREEDY,
) -> Iterator[str]:
    """Yield the answer's text as it is decoded; the pieces join into what `answer_many` returns."""
    text = TextStream(loaded, options)
    rows: list[Row] = []
    for rows in decode_rows(loaded, cache, [question], options):
        if piece := text.update(rows[0]):
            yield piece
    if rows and (piece := text.finish(rows[0])):
        yield piece
