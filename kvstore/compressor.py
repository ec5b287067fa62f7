"""Text -> token ids -> full KV -> scores -> keep mask (-> key channels) -> CompressedKV."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from kvstore.attention import observing
from kvstore.compressed import CompressedKV, CompressedLayer
from kvstore.models import LoadedModel
from kvstore.prefill import prefill
from kvstore.presses.base import Channels, ScorerPress, ScoringInput


def prefill_context(loaded: LoadedModel, document: str, press: ScorerPress | None = None) -> ScoringInput:
    """Frame and prefill a document (letting `press` watch if it wants); the result is what presses score."""
    frame = loaded.frame
    input_ids = frame.context_ids(document)
    if input_ids.shape[1] == len(frame.head_ids):
        raise ValueError("the document is empty after tokenization")
    observer = press.watch_prefill(len(frame.head_ids), input_ids.shape[1]) if press is not None else None
    with observing(observer) if observer is not None else nullcontext():
        cache = prefill(loaded.model, input_ids)
    return ScoringInput(loaded, cache, input_ids, len(frame.head_ids), observer)


def pack(run: ScoringInput, doc_keep: list[torch.Tensor], key_channels: Channels | None = None) -> CompressedKV:
    """Physically drop evicted pairs (the template prefix is always kept) and the key channels not chosen.

    `key_channels` (per layer [kv_heads, channels], from `press.key_channels`) applies to every kept
    row of a head, template prefix included; None stores every channel.
    """
    layers = []
    channels = key_channels if key_channels is not None else [None] * len(doc_keep)
    for layer, keep, chosen in zip(run.cache.layers, doc_keep, channels, strict=True):
        full_keep = torch.cat([keep.new_ones(keep.shape[0], run.prefix_length), keep], 1)
        layers.append(CompressedLayer.from_dense(layer.keys[0], layer.values[0], full_keep, chosen))
    return CompressedKV(layers, run.input_ids[0].to(torch.int32).cpu(), run.prefix_length)


def compress(
    loaded: LoadedModel, document: str, press: ScorerPress, on_stage: Callable[[str], None] | None = None
) -> CompressedKV:
    """Token selection first, then the press's channel stage (ThinK) on the pairs it kept.

    `on_stage` hears "prefilling" and "scoring" as each starts (workers publish them as progress).
    """
    if on_stage is not None:
        on_stage("prefilling")
    run = prefill_context(loaded, document, press)
    if on_stage is not None:
        on_stage("scoring")
    doc_keep = press.keep_masks(run)
    return pack(run, doc_keep, press.key_channels(run, doc_keep))
