"""Text -> token ids -> full KV -> scores -> keep mask -> CompressedKV."""

from __future__ import annotations

import torch

from kvstore.compressed import CompressedKV, CompressedLayer
from kvstore.models import LoadedModel
from kvstore.prefill import prefill
from kvstore.presses.base import ScorerPress, ScoringInput
from kvstore.prompt import ChatFrame


def prefill_context(loaded: LoadedModel, document: str) -> ScoringInput:
    """Frame and prefill a document; the result is what presses score."""
    frame = ChatFrame.for_tokenizer(loaded.tokenizer)
    input_ids = frame.context_ids(document)
    if input_ids.shape[1] == len(frame.head_ids):
        raise ValueError("the document is empty after tokenization")
    cache = prefill(loaded.model, input_ids)
    return ScoringInput(loaded, frame, cache, input_ids, len(frame.head_ids))


def pack(run: ScoringInput, doc_keep: list[torch.Tensor]) -> CompressedKV:
    """Physically drop evicted pairs; the template prefix is always kept."""
    layers = []
    for layer, keep in zip(run.cache.layers, doc_keep, strict=True):
        prefix_keep = keep.new_ones(keep.shape[0], run.prefix_length)
        layers.append(CompressedLayer.from_dense(layer.keys[0], layer.values[0], torch.cat([prefix_keep, keep], 1)))
    return CompressedKV(layers, run.input_ids[0].to(torch.int32).cpu(), run.prefix_length)


def compress(loaded: LoadedModel, document: str, press: ScorerPress) -> CompressedKV:
    run = prefill_context(loaded, document)
    return pack(run, press.keep_masks(run))
