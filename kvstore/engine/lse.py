"""Attention that also returns each query row's log-sum-exp, fused where torch offers it.

KVzip needs the softmax normaliser of every reconstruction query; getting it from the fused
kernel that computes the layer's output anyway avoids materialising the logits twice. Attention
over a key set split in parts (context keys unmasked, the queries' own keys causal) merges
exactly by log-sum-exp, which lets the kernel skip the masked half of the causal block.
"""

from __future__ import annotations

import torch


def attention_with_lse_math(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: query [B, H, q, D], key/value [B, H, k, D] (same heads); causal needs q == k."""
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    lse = logits.logsumexp(-1)
    probs = logits.sub_(lse[..., None]).exp_().to(value.dtype)
    return torch.matmul(probs, value), lse


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, q, D], logsumexp [B, H, q] in float32); fused on CPU (float32, bfloat16), plain math elsewhere."""
    if query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16):
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=None, scale=scale
        )
        return output, lse.float()
    return attention_with_lse_math(query, key, value, scale, causal)


def merge_attention(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions over disjoint key sets into the attention over their union."""
    lse = torch.stack([part_lse for _, part_lse in parts]).logsumexp(0)
    output = sum(out * (part_lse - lse).exp()[..., None].to(out.dtype) for out, part_lse in parts)
    return output, lse
