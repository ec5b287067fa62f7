"""Attention received by each context key during the prefill: what H2O, SnapKV, TOVA and PyramidKV score.

`ReceivedAttention` watches the (chunked) prefill and adds up, per layer and query head, the
softmax attention that every key receives from the query rows at or after `first_query`
(0 for H2O, the observation window for SnapKV, the last token for TOVA). It returns None, so
SDPA still computes the layer output and the cache is bit-identical to an unobserved prefill.
The logits are built a block of query rows at a time: memory is bounded by `_MAX_SCORE_ELEMENTS`,
never [Hq, T, T] and not even [Hq, chunk, T].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.presses.base import ScoringInput
from kvstore.presses.watch import watched_or_replayed, watched_rows

_MAX_SCORE_ELEMENTS = 1 << 24
GROUP_REDUCTIONS = ("mean", "max")


@dataclass
class ReceivedAttention:
    """Per layer [Hq, length] float32 sums of attention received from query rows >= first_query."""

    length: int
    first_query: int = 0
    sums: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        rows = watched_rows(query, key, self.length, self.first_query)
        if rows is None:
            return None
        start, first = rows
        q_heads, dim = query.shape[1], query.shape[3]
        kv_heads, k_len = key.shape[1], key.shape[2]
        if layer_idx not in self.sums:
            self.sums[layer_idx] = torch.zeros(q_heads, self.length, dtype=torch.float32, device=key.device)
        groups = q_heads // kv_heads
        keys_t = key[0].float().transpose(-1, -2)[:, None]  # [Hkv, 1, D, k]
        columns = torch.arange(k_len, device=key.device)
        step = max(1, _MAX_SCORE_ELEMENTS // (q_heads * k_len))
        total = torch.zeros(kv_heads, groups, k_len, dtype=torch.float32, device=key.device)
        for row in range(first, k_len, step):
            stop = min(k_len, row + step)
            rows = query[0, :, row - start : stop - start].float().reshape(kv_heads, groups, stop - row, dim)
            logits = torch.matmul(rows * scaling, keys_t)  # [Hkv, G, rows, k]
            future = columns[None, :] > torch.arange(row, stop, device=key.device)[:, None]
            total += logits.masked_fill_(future, float("-inf")).softmax(dim=-1).sum(dim=2)
        self.sums[layer_idx][:, :k_len] += total.view(q_heads, k_len)
        return None

    def per_kv_head(self, layer_idx: int, kv_heads: int, prefix_length: int, reduce: str = "mean") -> torch.Tensor:
        """[kv_heads, doc_tokens]: the document columns, query heads of a GQA group pooled by mean or max."""
        if reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"unknown group reduction {reduce!r}: choose one of {', '.join(GROUP_REDUCTIONS)}")
        sums = self.sums[layer_idx][:, prefix_length:]
        grouped = sums.view(kv_heads, -1, sums.shape[-1])
        return grouped.mean(dim=1) if reduce == "mean" else grouped.amax(dim=1)


def received_attention(run: ScoringInput, first_query: int) -> ReceivedAttention:
    """Attention received from rows >= first_query: watched during the prefill, or replayed."""
    return watched_or_replayed(run, ReceivedAttention, first_query)
