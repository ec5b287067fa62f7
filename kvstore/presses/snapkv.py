"""SnapKV, question-agnostic: the last `window_size` context tokens act as the observation window.

Score of a document key = attention it receives from the window's queries (summed over the
window, averaged over the query heads of its GQA group), smoothed by a 1-D max or average pool
over neighbouring positions so that kept tokens come with their context. The window itself always
outranks everything else (it is the "instruction" SnapKV keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.received import ReceivedAttention, received_attention
from kvstore.presses.registry import register

POOLINGS = ("max", "avg")


def pool_positions(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """[heads, tokens] -> same shape, each position replaced by the max/mean of its kernel neighbourhood."""
    if scores.shape[-1] == 0:
        return scores
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(scores[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]


def window_scores(window_attention: torch.Tensor, window_size: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """[kv_heads, doc_tokens] attention from the window -> SnapKV scores (pooled; window on top)."""
    tokens = window_attention.shape[-1]
    outside = max(0, tokens - window_size)
    scores = window_attention.clone()
    scores[:, :outside] = pool_positions(window_attention[:, :outside], kernel_size, pooling)
    top = scores[:, :outside].amax() + 1.0 if outside else scores.new_tensor(1.0)
    recency = torch.arange(1, tokens - outside + 1, dtype=scores.dtype, device=scores.device) / (tokens - outside + 1)
    scores[:, outside:] = top + recency  # the window outranks all; within it, later tokens first
    return scores


@register
@dataclass
class SnapKVPress(TokenPress):
    name = "snapkv"
    budget: str = "uniform"
    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("snapkv needs window_size >= 1 and an odd kernel_size >= 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def first_query(self, prefix_length: int, length: int) -> int:
        """The observation window: the last `window_size` tokens, never reaching into the template prefix."""
        return max(prefix_length, length - self.window_size)

    def watch_prefill(self, prefix_length: int, length: int) -> ReceivedAttention:
        return ReceivedAttention(length, first_query=self.first_query(prefix_length, length))

    def score(self, run: ScoringInput) -> Scores:
        received = received_attention(run, self.first_query(run.prefix_length, run.length))
        return [
            window_scores(
                received.per_kv_head(i, layer.keys.shape[1], run.prefix_length, "mean"),
                self.window_size,
                self.kernel_size,
                self.pooling,
            )
            for i, layer in enumerate(run.cache.layers)
        ]
