"""Greedy decoding of one or many questions against a CompressedCache, then back to the prefix."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvstore.decode.cache import CompressedCache
from kvstore.engine.models import LoadedModel

DEFAULT_MAX_NEW_TOKENS = 64


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


@torch.inference_mode()
def greedy_tokens(
    loaded: LoadedModel,
    cache: CompressedCache,
    question_ids: list[list[int]],
    stop_ids: set[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B]) until all rows stopped; the cache is reset afterwards."""
    device = loaded.device
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else next(iter(stop_ids))
    input_ids, suffix_mask, positions = _batch_inputs(question_ids, pad_id, cache.original_length)
    context_mask = torch.ones((len(question_ids), cache.original_length), dtype=torch.long)
    attention_mask = torch.cat([context_mask, suffix_mask], dim=1).to(device)
    input_ids, positions = input_ids.to(device), positions.to(device)
    done = torch.zeros(len(question_ids), dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    cache.reset()
    try:
        for _ in range(max_new_tokens):
            logits = loaded.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits
            next_ids = logits[:, -1].argmax(-1).masked_fill(done, pad_id)
            yield next_ids
            done |= torch.isin(next_ids, stops)
            if bool(done.all()):
                break
            input_ids = next_ids[:, None]
            positions = positions[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(question_ids), 1)], dim=1)
    finally:
        cache.reset()


def answer_many(
    loaded: LoadedModel, cache: CompressedCache, questions: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> list[str]:
    """Decode all questions as one batch against the shared compressed prefix."""
    frame = loaded.frame
    stop_ids = frame.stop_ids()
    rows: list[list[int]] = [[] for _ in questions]
    finished = [False] * len(questions)
    for step in greedy_tokens(loaded, cache, [frame.question_ids(q) for q in questions], stop_ids, max_new_tokens):
        for row, token in enumerate(step.tolist()):
            if finished[row] or token in stop_ids:
                finished[row] = True
                continue
            rows[row].append(token)
    return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in rows]


def stream_answer(
    loaded: LoadedModel, cache: CompressedCache, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> Iterator[str]:
    """Yield the answer's text as it is decoded."""
    frame = loaded.frame
    stop_ids = frame.stop_ids()
    tokens: list[int] = []
    shown = ""
    for step in greedy_tokens(loaded, cache, [frame.question_ids(question)], stop_ids, max_new_tokens):
        token = int(step[0])
        if token in stop_ids:
            break
        tokens.append(token)
        text = loaded.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
