"""Attention that also returns each query row's log-sum-exp, fused where torch offers it.

KVzip needs the softmax normaliser of every reconstruction query; getting it from the fused
kernel that computes the layer's output anyway avoids materialising the logits twice (on CUDA a
plain-math pass over a 32K context would build gigabytes of logits per layer). Attention over a
key set split in parts (context keys unmasked, the queries' own keys causal) merges exactly by
log-sum-exp, which lets the kernel skip the masked half of the causal block.

GQA: keys and values may have fewer heads than the query. Without a causal mask each group's query
heads fold into the query rows (a view), so keys are never copied per query head; a causal part
(the reconstruction tokens' own keys, as long as one chunk) repeats its keys per head instead.
"""

from __future__ import annotations

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def choose_lse_op(device: torch.device, dtype: torch.dtype, key_dim: int, value_dim: int, masked: bool = False) -> str:
    """Which op computes attention with log-sum-exp for tensors on `device` in `dtype`.

    "cpu_flash" (CPU, float32 / bfloat16 / float16), "cuda_flash" (CUDA, float16 / bfloat16, head
    dim a multiple of 8 up to 256, no mask), "cuda_efficient" (CUDA otherwise: float32, or a
    mask), "math" elsewhere or when keys and values differ in width (the fused ops need one head size).
    """
    if key_dim != value_dim:
        return "math"
    if device.type == "cpu" and dtype in (torch.float32, *FLASH_DTYPES):
        return "cpu_flash"
    if device.type == "cuda":
        if dtype in FLASH_DTYPES and key_dim % 8 == 0 and key_dim <= 256 and not masked:
            return "cuda_flash"
        return "cuda_efficient"
    return "math"


def attention_with_lse_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: query [B, H, q, D], key/value [B, H, k, D] (same heads); causal needs q == k.

    `mask`: boolean, broadcastable to [B, H, q, k], True where a query may attend.
    """
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = logits.logsumexp(-1)
    probs = logits.sub_(lse[..., None]).exp_().nan_to_num_(0.0).to(value.dtype)  # rows that see nothing: 0
    return torch.matmul(probs, value), lse


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return (
        None
        if mask is None
        else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
    )


def _cpu_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None
):
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale
    )
    return output, lse


def _cuda_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None
):
    output, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, return_debug_mask=False, scale=scale
    )
    return output, lse


def _cuda_efficient(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None
):
    bias = _additive(mask, q.dtype)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    output, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, causal, scale=scale
    )
    return output, lse[..., : q.shape[-2]]  # rows are padded to the kernel's block size


LSE_OPS = {"cpu_flash": _cpu_flash, "cuda_flash": _cuda_flash, "cuda_efficient": _cuda_efficient}


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    causal: bool = False,
    op: str | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, Hq, q, D], logsumexp [B, Hq, q] float32); key/value [B, Hkv, k, D] with Hq % Hkv == 0.

    `mask` (boolean, broadcastable to [B, Hkv, G*q, k] in the folded layout, True = may attend):
    a row that may attend to nothing gets output 0 and log-sum-exp -inf. `op` forces one of
    `choose_lse_op`'s answers (tests compare them where both run).
    """
    batch, q_heads, q_len, dim = query.shape
    groups = q_heads // key.shape[1]
    if groups > 1 and causal:  # the causal block is one chunk long: copying it per head is bounded
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)
    op = op or choose_lse_op(query.device, query.dtype, key.shape[-1], value.shape[-1], mask is not None)
    if op == "math":
        output, lse = attention_with_lse_math(folded, key, value, scale, causal, mask)
    else:
        output, lse = LSE_OPS[op](folded, key, value, scale, causal, mask)
        if mask is not None:  # fused ops leave a fully masked row's log-sum-exp finite
            lse = lse.float().masked_fill(~mask.any(-1), float("-inf"))
    return output.reshape(batch, q_heads, q_len, -1), lse.float().reshape(batch, q_heads, q_len)


def merge_attention(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions over disjoint key sets into the attention over their union."""
    lse = torch.stack([part_lse for _, part_lse in parts]).logsumexp(0)
    output = sum(out * (part_lse - lse).exp()[..., None].to(out.dtype) for out, part_lse in parts)
    return output, lse
