"""kvstore's attention function, registered with transformers' AttentionInterface.

It does two jobs that model code cannot do by itself, without patching any model:

* ragged decoding: a `CompressedCache` layer hands over its prefix, one tensor per KV head of
  that head's own length (no padding to mask, nothing wasted), and this function attends to each
  head's prefix and the newly appended tokens under one softmax;
* observation: a scoring press may watch the post-RoPE queries and keys of every layer during a
  forward pass (KVzip's reconstruction pass, H2O's prefill) without a second implementation.

Everything else falls through to transformers' SDPA attention, so a model set to this
implementation behaves exactly like the stock one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "kvstore"
# Bound on the score matrix elements materialised at once when attending to a prefix.
_MAX_SCORE_ELEMENTS = 1 << 26


class AttentionObserver(Protocol):
    """Sees each layer's post-RoPE queries, keys and values during an observed forward pass.

    It may return the attention output ([B, q, Hq, D], causal over the keys' last q positions) when
    it computes it anyway, so the same logits are not built twice; None lets SDPA compute it.
    """

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor | None: ...


@dataclass
class RaggedPrefix:
    """One layer's compressed prefix: each KV head keeps its own number of rows, with no padding.

    With `key_channels` (ThinK), head h stores only those key channels: its prefix scores use the
    query projected onto them, which equals zeroing the pruned channels of query and prefix keys.
    """

    keys: list[torch.Tensor]  # per kv head: [kept_h, head_dim], or [kept_h, channels] when key channels are pruned
    values: list[torch.Tensor]  # per kv head: [kept_h, head_dim]
    key_channels: list[torch.Tensor] | None = None  # per kv head: int64 [channels] ascending, or None (all)

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, *(self.key_channels or ()))
        return sum(t.numel() * t.element_size() for t in tensors)


_local = threading.local()


@contextmanager
def observing(observer: AttentionObserver) -> Iterator[AttentionObserver]:
    """Let `observer` see every attention call made by this thread inside the block."""
    previous = getattr(_local, "observer", None)
    _local.observer = observer
    try:
        yield observer
    finally:
        _local.observer = previous


def hand_over_prefix(suffix_keys: torch.Tensor, prefix: RaggedPrefix) -> None:
    """Called by a ragged cache layer's `update`: the next attention call on these keys needs `prefix`.

    The handshake is checked by identity of the returned key tensor, so a model that does not route
    attention through this function fails loudly instead of silently ignoring the prefix.
    """
    pending = getattr(_local, "pending", None)
    if pending is not None:
        raise RuntimeError(
            "a CompressedCache needs attn_implementation='kvstore': "
            "load models with kvstore.models.load_model or call model.set_attn_implementation('kvstore')"
        )
    _local.pending = (suffix_keys, prefix)


def clear_pending() -> None:
    """Forget a hand-over left behind by a forward pass that raised midway."""
    _local.pending = None


def _take_prefix(key: torch.Tensor) -> RaggedPrefix | None:
    pending = getattr(_local, "pending", None)
    if pending is None or pending[0] is not key:
        return None
    _local.pending = None
    return pending[1]


def _suffix_mask(mask: torch.Tensor | None, q_len: int, s_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, q, S] mask over the appended tokens (causal when transformers gave none)."""
    if mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (s_len - q_len)
        return (torch.arange(s_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:  # additive float mask
        mask = mask == 0
    return mask[..., -s_len:]


def _attend_one_head(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    suffix_mask: torch.Tensor,
    scaling: float,
    key_channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, rows, D] of one GQA group over its own prefix [kept, D or channels] and the suffix [B, S, D]."""
    prefix_query = query if key_channels is None else query.index_select(-1, key_channels)
    prefix_scores = torch.matmul(prefix_query, prefix_keys.T) * scaling  # prefix broadcast over the batch
    suffix_scores = torch.matmul(query, suffix_keys.transpose(-1, -2)) * scaling
    suffix_scores = suffix_scores.masked_fill(~suffix_mask, float("-inf"))
    probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], dim=-1), dim=-1, dtype=torch.float32)
    probs = probs.to(query.dtype)
    kept = prefix_keys.shape[0]
    return torch.matmul(probs[..., :kept], prefix_values) + torch.matmul(probs[..., kept:], suffix_values)


def ragged_attention(
    query: torch.Tensor,
    prefix: RaggedPrefix,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    suffix_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attend to [own prefix ; suffix] under one softmax per KV head; returns [B, q, Hq, D].

    query [B, Hq, q, D]; suffix K/V [B, Hkv, S, D]. Each head's prefix is shared by every batch
    row and broadcast, never copied or padded.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, s_len = suffix_keys.shape[1], suffix_keys.shape[2]
    groups = q_heads // kv_heads
    mask = _suffix_mask(suffix_mask, q_len, s_len, query.device)
    longest = max(k.shape[0] for k in prefix.keys)
    rows_per_step = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * groups * (longest + s_len)))
    blocks = []
    for start in range(0, q_len, rows_per_step):
        stop = min(q_len, start + rows_per_step)
        # [B, Hkv, G*r, D]: query heads of one GQA group are contiguous; mask rows tile per head.
        q_block = query[:, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), dim)
        block_mask = mask[:, 0, start:stop].repeat(1, groups, 1)
        heads = [
            _attend_one_head(
                q_block[:, h],
                prefix.keys[h],
                prefix.values[h],
                suffix_keys[:, h],
                suffix_values[:, h],
                block_mask,
                scaling,
                None if prefix.key_channels is None else prefix.key_channels[h],
            )
            for h in range(kv_heads)
        ]
        blocks.append(torch.stack(heads, dim=1).reshape(batch, q_heads, stop - start, dim))
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous()


def kvstore_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The registered attention implementation (see module docstring)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    observer = getattr(_local, "observer", None)
    if observer is not None:
        output = observer.observe(module.layer_idx, query, key, value, scale)
        if output is not None:
            return output, None
    prefix = _take_prefix(key)
    if prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return ragged_attention(query, prefix, key, value, attention_mask, scale), None


AttentionInterface.register(ATTENTION_NAME, kvstore_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
