"""The appended tokens' part of decode attention: their mask, and attention over them with log-sum-exp.

The suffix (question and answer tokens, one row per batch question) is small and dense: one fused
attention call with log-sum-exp over it (`kvstore.engine.lse`); GQA folds each group's query heads
into the query rows, so suffix keys are never copied per query head.
"""

from __future__ import annotations

import torch

from kvstore.engine.lse import attention_with_lse


def suffix_mask(mask: torch.Tensor | None, q_len: int, s_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, q, S] mask over the appended tokens (causal when transformers gave none)."""
    if mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (s_len - q_len)
        return (torch.arange(s_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:  # additive float mask
        mask = mask == 0
    return mask[..., -s_len:]


def suffix_attention(
    grouped_query: torch.Tensor,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_query [B, Hkv, G*q, D] (group-major rows) over suffix K/V [B, Hkv, S, D] under `mask`.

    Returns (output [B, Hkv, G*q, D], log-sum-exp [B, Hkv, G*q] float32; -inf where a row sees nothing).
    """
    groups = grouped_query.shape[2] // mask.shape[2]
    allowed = mask[:, 0].repeat(1, groups, 1)[:, None]  # [B or 1, 1, G*q, S]
    return attention_with_lse(grouped_query, suffix_keys, suffix_values, scaling, mask=allowed)
