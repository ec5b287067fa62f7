"""Chunked prefill: peak activation memory is bounded by the chunk, not the document."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

DEFAULT_PREFILL_CHUNK = 2048


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: DynamicCache | None = None,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    on_chunk: Callable[[int], None] | None = None,
) -> DynamicCache:
    """Run `input_ids` [1, T] into `cache` (a new DynamicCache by default), `chunk_size` tokens at a time.

    `on_chunk` hears the tokens done after each chunk (progress displays)."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    input_ids = input_ids.to(model.device)
    for start in range(0, input_ids.shape[1], chunk_size):
        model(input_ids=input_ids[:, start : start + chunk_size], cache=cache, use_cache=True, logits_to_keep=1)
        if on_chunk is not None:
            on_chunk(min(input_ids.shape[1], start + chunk_size))
    return cache
