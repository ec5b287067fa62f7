"""An optional blend step for a composition: recompute the K/V of a few later-segment tokens against
the composed prefix, to win back part of the attention across documents (the CacheBlend idea).

Each stored segment was prefilled alone, so from layer 1 on its K/V lack what its tokens would have
read in the earlier segments. Recomputing every token costs a prefill; CacheBlend's observation is
that a small fraction of tokens carries most of the difference. So:

1. selection: the later segments' kept tokens are run through the first two layers attending to the
   composed prefix; their layer-1 K/V are compared with the stored ones and the `fraction` that
   deviate most are chosen;
2. recomputation: the chosen tokens run through every layer, attending (causally, by position) to
   the composed prefix with their own rows replaced by the new K/V; the new K/V overwrite the
   stored rows in every head that kept them.

Both passes go through the model's own layers: kvstore's attention observer does the attention,
so no model code is copied. The result is a new CompressedKV with the same rows (same memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvstore.engine.attention import observing
from kvstore.engine.models import LoadedModel
from kvstore.errors import InputError
from kvstore.kv.compressed import CompressedKV, CompressedLayer

SELECTION_LAYER = 1  # the first layer whose K/V depend on attention (layer 0's come from embeddings alone)


class _Enough(Exception):
    """Raised by the selection pass once it has the layer it needs: the rest of the forward is skipped."""


def _head_rows(layer: CompressedLayer) -> list[slice]:
    starts = torch.cumsum(layer.lengths.long(), 0) - layer.lengths.long()
    return [slice(int(s), int(s + n)) for s, n in zip(starts, layer.lengths.long(), strict=True)]


def _dense_head_keys(layer: CompressedLayer, head: int, rows: slice) -> torch.Tensor:
    keys = layer.keys[rows].float()
    if layer.key_channels is None:
        return keys
    dense = keys.new_zeros(keys.shape[0], layer.head_dim)
    return dense.index_copy_(1, layer.key_channels[head].long(), keys)


@dataclass
class _Recompute:
    """Attention for the recomputed tokens at each layer, per KV head: the head's stored rows (those of
    recomputed tokens replaced by their new K/V) at positions up to each query's. Keeps the new K/V."""

    composed: CompressedKV
    positions: torch.Tensor  # [n] composed positions of the recomputed tokens, ascending
    stop_after: int | None = None  # layer index after which to abort (selection pass)
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        if self.stop_after is not None and layer_idx > self.stop_after:
            raise _Enough
        layer = self.composed.layers[layer_idx]
        new_k, new_v = key[0].float().cpu(), value[0].float().cpu()  # [Hkv, n, D]
        self.new_kv[layer_idx] = (new_k, new_v)
        groups = query.shape[1] // key.shape[1]
        qpos = self.positions
        out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
        for head, rows in enumerate(_head_rows(layer)):
            pos = layer.positions[rows].long()
            keys, values = _dense_head_keys(layer, head, rows), layer.values[rows].float().clone()
            mine = torch.isin(pos, qpos)  # rows of recomputed tokens this head kept: their new K/V
            index = torch.searchsorted(qpos, pos[mine])
            keys[mine], values[mine] = new_k[head][index], new_v[head][index]
            q = query[0, head * groups : (head + 1) * groups].float().cpu()  # [G, n, D]
            scores = torch.matmul(q, keys.T) * scaling
            scores = scores.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
            attended = torch.matmul(scores.softmax(-1), values).transpose(0, 1)  # [n, G, D]
            out[:, head * groups : (head + 1) * groups] = attended.to(out.device, out.dtype)
        return out[None]


@torch.inference_mode()
def _run(loaded: LoadedModel, composed: CompressedKV, positions: torch.Tensor, stop_after: int | None) -> _Recompute:
    observer = _Recompute(composed, positions, stop_after)
    ids = composed.token_ids.long()[positions][None].to(loaded.device)
    try:
        with observing(observer):
            loaded.model(
                input_ids=ids,
                position_ids=positions[None].to(loaded.device),
                cache=DynamicCache(config=loaded.model.config),
                logits_to_keep=1,
            )
    except _Enough:
        pass
    return observer


def _kept_positions(layer: CompressedLayer, later: torch.Tensor) -> torch.Tensor:
    """Positions of later-segment tokens that at least one head of `layer` kept, ascending."""
    return torch.unique(layer.positions.long()[torch.isin(layer.positions.long(), later)])


def _deviation(
    layer: CompressedLayer, candidates: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor
) -> torch.Tensor:
    """Per candidate token, the summed L2 distance of new vs stored K/V over the heads that kept it."""
    total = torch.zeros(candidates.numel())
    for head, rows in enumerate(_head_rows(layer)):
        pos = layer.positions[rows].long()
        kept = torch.isin(candidates, pos)
        where = torch.searchsorted(pos, candidates[kept])
        stored_k = _dense_head_keys(layer, head, rows)[where]
        stored_v = layer.values[rows].float()[where]
        total[kept] += (new_k[head][kept] - stored_k).norm(dim=-1) + (new_v[head][kept] - stored_v).norm(dim=-1)
    return total


def blend(loaded: LoadedModel, composed: CompressedKV, later_start: int, fraction: float) -> tuple[CompressedKV, int]:
    """Recompute `fraction` of the kept tokens at positions >= `later_start` (the segments after the
    first); returns the blended context (a copy) and how many tokens were recomputed."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"blend fraction must be in [0, 1], got {fraction}")
    later = torch.arange(later_start, composed.original_length)
    candidates = _kept_positions(composed.layers[SELECTION_LAYER], later)
    count = round(fraction * candidates.numel())
    if count == 0:
        return composed, 0
    selection = _run(loaded, composed, candidates, stop_after=SELECTION_LAYER)
    new_k, new_v = selection.new_kv[SELECTION_LAYER]
    deviation = _deviation(composed.layers[SELECTION_LAYER], candidates, new_k, new_v)
    chosen = candidates[deviation.topk(count).indices].sort().values
    recomputed = _run(loaded, composed, chosen, stop_after=None)
    layers = [_overwrite(layer, chosen, *recomputed.new_kv[i]) for i, layer in enumerate(composed.layers)]
    return CompressedKV(layers, composed.token_ids, composed.prefix_length), count


def _overwrite(
    layer: CompressedLayer, chosen: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor
) -> CompressedLayer:
    keys, values = layer.keys.clone(), layer.values.clone()
    for head, rows in enumerate(_head_rows(layer)):
        pos = layer.positions[rows].long()
        hit = torch.isin(chosen, pos)
        if not bool(hit.any()):
            continue
        where = rows.start + torch.searchsorted(pos, chosen[hit])
        head_keys = new_k[head][hit]
        if layer.key_channels is not None:
            head_keys = head_keys.index_select(1, layer.key_channels[head].long())
        keys[where] = head_keys.to(keys.dtype)
        values[where] = new_v[head][hit].to(values.dtype)
    return CompressedLayer(keys, values, layer.lengths, layer.positions, layer.key_channels)


def later_segments_start(parts: Sequence[CompressedKV]) -> int:
    """Composed position where the second segment starts (everything before it is the first context)."""
    return parts[0].original_length
