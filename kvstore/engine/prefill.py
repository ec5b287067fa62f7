"""Chunked prefill: peak activation memory is bounded by the chunk, not the document."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

DEFAULT_PREFILL_CHUNK = 2048


@torch.inference_mode()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: DynamicCache | None = None,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
) -> DynamicCache:
    """Run `input_ids` [1, T] into `cache` (a new DynamicCache by default), `chunk_size` tokens at a time."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    input_ids = input_ids.to(model.device)
    for start in range(0, input_ids.shape[1], chunk_size):
        model(
            input_ids=input_ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
    return cache
