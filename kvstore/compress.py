"""Text -> token ids -> full KV -> scores -> keep mask (-> key channels) -> CompressedKV."""

from __future__ import annotations

import torch

from kvstore.engine.models import LoadedModel
from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.presses.base import Channels, Press, ScoringInput, TokenPress, prefill_context
from kvstore.presses.budget import Scores
from kvstore.stages import Progress


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
    progress: Progress | None = None,
) -> CompressedKV:
    """Prefill, then token selection, then the press's channel stage (ThinK) on the pairs it kept.

    `progress` hears ("prefilling", tokens done) after each prefill chunk, then ("scoring", tokens
    done) as the press reports it (KVzip: per reconstructed chunk); workers publish it as task state.
    """
    report = progress or (lambda stage, done: None)
    report("prefilling", 0)
    run = prefill_context(loaded, document, press, lambda done: report("prefilling", done))
    report("scoring", 0)
    run.progress = lambda done: report("scoring", done)
    return cut(run, press)
