"""Text -> token ids -> full KV -> scores -> keep mask (-> key channels) -> CompressedKV."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstore.engine.models import LoadedModel
from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.presses.base import Channels, Press, ScoringInput, TokenPress, prefill_context
from kvstore.presses.budget import Scores


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


def cut(run: ScoringInput, press: Press, scores: Scores | None = None) -> CompressedKV:
    """Apply `press` to a prefilled context: keep masks (from `scores` when a token press already scored),
    then the key channels of what was kept, then pack."""
    if scores is not None and isinstance(press, TokenPress):
        masks = press.masks_from_scores(scores, run)
    else:
        masks = press.keep_masks(run)
    return pack(run, masks, press.key_channels(run, masks))


def compress(
    loaded: LoadedModel,
    document: str | list[int],
    press: Press,
    on_stage: Callable[[str], None] | None = None,
) -> CompressedKV:
    """Prefill, then token selection, then the press's channel stage (ThinK) on the pairs it kept.

    `on_stage` hears "prefilling" and "scoring" as each starts (workers publish them as progress).
    """
    if on_stage is not None:
        on_stage("prefilling")
    run = prefill_context(loaded, document, press)
    if on_stage is not None:
        on_stage("scoring")
    return cut(run, press)
