"""The masked decode kernel: a layer's whole packed prefix in one matmul, each head's rows kept to its own.

Every KV head's query rows score against all the layer's packed prefix rows at once and the other
heads' rows are masked out, so a layer costs a fixed handful of ops whatever its number of heads,
at kv_heads times the score arithmetic of the per-head kernels. On CPU with few query rows (one
question decoding) per-op overhead dominates that arithmetic when a model has few KV heads
(SmolLM2: 3), and this measured faster than the loop there (docs/BENCHMARKS.md, decode kernels);
with many heads or many rows the extra arithmetic wins and the loop or the fused kernel is chosen.
Nothing is padded: the only extra memory is a boolean row-owner mask per prefix (kv_heads bytes a
row, against 2 x head_dim x 4 bytes of K/V a row in float32), and a call whose scores would exceed
`MAX_SCORES` goes to the loop kernel instead.
"""

from __future__ import annotations

import weakref

import torch

from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.kernels.suffix import suffix_mask
from kvstore.decode.prefix import RaggedPrefix

# The score matrix is [kv_heads, rows, kept + suffix]: past this many elements (256 MiB in float32) the
# call goes to the loop kernel, which works head by head in bounded blocks.
MAX_SCORES = 1 << 26
_foreign_rows: weakref.WeakKeyDictionary[RaggedPrefix, torch.Tensor] = weakref.WeakKeyDictionary()


def _foreign(prefix: RaggedPrefix) -> torch.Tensor:
    """[kv_heads, 1, kept]: True where a packed row belongs to another head (built once per prefix)."""
    if prefix not in _foreign_rows:
        device = prefix.keys.device
        lengths = torch.tensor(prefix.lengths, device=device)
        owner = torch.repeat_interleave(torch.arange(prefix.kv_heads, device=device), lengths)
        _foreign_rows[prefix] = (owner[None, :] != torch.arange(prefix.kv_heads, device=device)[:, None])[:, None]
    return _foreign_rows[prefix]


def masked_attention(
    query: torch.Tensor,
    prefix: RaggedPrefix,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Same contract as the reference `loop.ragged_attention`: query [B, Hq, q, D] -> [B, q, Hq, D]."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, s_len = suffix_keys.shape[1], suffix_keys.shape[2]
    groups, rows, kept = q_heads // kv_heads, batch * (q_heads // kv_heads) * q_len, prefix.keys.shape[0]
    if kv_heads * rows * (kept + s_len) > MAX_SCORES:  # a big batch or prompt: the loop bounds its scores
        return ragged_attention(query, prefix, suffix_keys, suffix_values, attention_mask, scaling)
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)  # a group's query heads are contiguous
    per_head = grouped.transpose(0, 1).reshape(kv_heads, rows, dim)  # rows ordered (batch, group, token)
    if prefix.key_channels is not None:
        per_head = per_head.gather(2, prefix.key_channels[:, None, :].expand(-1, rows, -1))
    prefix_scores = (per_head.reshape(kv_heads * rows, -1) @ prefix.keys.T).view(kv_heads, rows, kept)
    prefix_scores = prefix_scores.mul_(scaling).masked_fill_(_foreign(prefix), float("-inf"))
    allowed = suffix_mask(attention_mask, q_len, s_len, query.device)[:, 0].repeat(1, groups, 1)[:, None]
    suffix_scores = (grouped @ suffix_keys.transpose(-1, -2)).mul_(scaling).masked_fill_(~allowed, float("-inf"))
    suffix_scores = suffix_scores.transpose(0, 1).reshape(kv_heads, rows, s_len)
    probs = torch.softmax(torch.cat([prefix_scores, suffix_scores], dim=-1), dim=-1, dtype=torch.float32)
    probs = probs.to(query.dtype)
    from_prefix = (probs[..., :kept].reshape(kv_heads * rows, kept) @ prefix.values).view(
        kv_heads, batch, groups * q_len, -1
    )
    suffix_probs = probs[..., kept:].reshape(kv_heads, batch, groups * q_len, s_len).transpose(0, 1)
    output = from_prefix.transpose(0, 1) + suffix_probs @ suffix_values
    return output.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous()
