"""Attention that also returns each query row's log-sum-exp, fused where torch offers it.

KVzip needs the softmax normaliser of every reconstruction query; getting it from the fused
kernel that computes the layer's output anyway avoids materialising the logits twice.
"""

from __future__ import annotations

import torch


def attention_with_lse_math(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: query [B, H, q, D], key/value [B, H, k, D] (same heads), additive bias [q, k]."""
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scale + bias
    lse = logits.logsumexp(-1)
    probs = logits.sub_(lse[..., None]).exp_().to(value.dtype)
    return torch.matmul(probs, value), lse


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, H, q, D], logsumexp [B, H, q] in float32); fused on CPU, plain math elsewhere."""
    if query.device.type == "cpu" and query.dtype == torch.float32:
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=bias, scale=scale
        )
        return output, lse.float()
    return attention_with_lse_math(query, key, value, bias, scale)
