"""The reference decode kernel: a Python loop over KV heads, each attending to its own prefix.

Each head's prefix is shared by every batch row and broadcast, never copied or padded; query rows
are processed in blocks so the score matrix stays bounded.
"""

from __future__ import annotations

import torch

from kvstore.decode.kernels.suffix import suffix_mask
from kvstore.decode.prefix import RaggedPrefix

# Bound on the score matrix elements materialised at once when attending to a prefix.
_MAX_SCORE_ELEMENTS = 1 << 26


def _attend_one_head(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    key_channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, rows, D] of one GQA group over its own prefix [kept, D or channels] and the suffix [B, S, D]."""
    prefix_query = query if key_channels is None else query.index_select(-1, key_channels)
    prefix_scores = torch.matmul(prefix_query, prefix_keys.T) * scaling  # prefix broadcast over the batch
    suffix_scores = torch.matmul(query, suffix_keys.transpose(-1, -2)) * scaling
    suffix_scores = suffix_scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], dim=-1), dim=-1, dtype=torch.float32)
    probs = probs.to(query.dtype)
    kept = prefix_keys.shape[0]
    return torch.matmul(probs[..., :kept], prefix_values) + torch.matmul(probs[..., kept:], suffix_values)


def ragged_attention(
    query: torch.Tensor,
    prefix: RaggedPrefix,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attend to [own prefix ; suffix] under one softmax per KV head; returns [B, q, Hq, D].

    query [B, Hq, q, D]; suffix K/V [B, Hkv, S, D]. Each head's prefix is shared by every batch
    row and broadcast, never copied or padded.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, s_len = suffix_keys.shape[1], suffix_keys.shape[2]
    groups = q_heads // kv_heads
    mask = suffix_mask(attention_mask, q_len, s_len, query.device)
    longest = max(prefix.lengths, default=0)
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
                prefix.head_keys[h],
                prefix.head_values[h],
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
