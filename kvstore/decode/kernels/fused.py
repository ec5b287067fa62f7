"""The fused decode kernel: the whole layer's prefix in one attention call, the suffix in another.

Every query row of a KV head (batch x GQA group x new tokens) attends to that head's packed prefix
rows through a fused op that also returns the log-sum-exp (`prefix_ops`: one varlen call over the
cumulative per-head lengths on CUDA); the suffix gets one dense call; the two merge exactly by
log-sum-exp into the softmax over [own prefix ; suffix]. Nothing is padded or copied per query
head, so memory in use stays what was kept.
"""

from __future__ import annotations

import torch

from kvstore.decode.kernels.prefix_ops import PREFIX_OPS, choose_prefix_op
from kvstore.decode.kernels.suffix import suffix_attention, suffix_mask
from kvstore.decode.prefix import RaggedPrefix


def _merge(prefix: tuple[torch.Tensor, torch.Tensor], suffix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention over two disjoint key sets -> over their union; a part that saw nothing weighs zero."""
    lse = torch.logaddexp(prefix[1], suffix[1])
    prefix_weight = (prefix[1] - lse).exp_().nan_to_num_(0.0)[..., None].to(prefix[0].dtype)
    suffix_weight = (suffix[1] - lse).exp_().nan_to_num_(0.0)[..., None].to(suffix[0].dtype)
    return torch.addcmul(prefix[0] * prefix_weight, suffix[0], suffix_weight)


def fused_attention(
    query: torch.Tensor,
    prefix: RaggedPrefix,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Same contract as the reference `loop.ragged_attention`; `backend` forces a prefix op (tests, benchmarks)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, s_len = suffix_keys.shape[1], suffix_keys.shape[2]
    groups, rows = q_heads // kv_heads, batch * (q_heads // kv_heads) * q_len
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)  # a group's query heads are contiguous
    per_head = grouped.transpose(0, 1).reshape(kv_heads, rows, dim)  # rows ordered (batch, group, token)
    if prefix.key_channels is not None:
        per_head = per_head.gather(2, prefix.key_channels[:, None, :].expand(-1, rows, -1))
    backend = backend or choose_prefix_op(query.device, query.dtype, per_head.shape[-1], dim)
    out, lse = PREFIX_OPS[backend](per_head, prefix, scaling)
    if 0 in prefix.lengths:  # a head that kept nothing weighs zero, whatever the backend left in its rows
        empty = torch.tensor([n == 0 for n in prefix.lengths], device=lse.device)[:, None]
        lse, out = lse.masked_fill(empty, float("-inf")), out.masked_fill(empty[..., None], 0.0)
    from_prefix = (
        out.reshape(kv_heads, batch, groups * q_len, dim).transpose(0, 1),
        lse.reshape(kv_heads, batch, groups * q_len).transpose(0, 1),
    )
    mask = suffix_mask(attention_mask, q_len, s_len, query.device)
    from_suffix = suffix_attention(grouped, suffix_keys, suffix_values, mask, scaling)
    output = _merge(from_prefix, from_suffix).to(query.dtype)
    return output.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous()
