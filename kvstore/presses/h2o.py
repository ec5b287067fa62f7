"""H2O (heavy hitters): a KV pair matters as much as the attention it accumulated during the prefill.

Score of a document key = sum over every context query of the softmax attention it received,
pooled over the query heads of its GQA group (mean by default, or max).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.received import GROUP_REDUCTIONS, ReceivedAttention, received_attention
from kvstore.presses.registry import register


@register
@dataclass
class H2OPress(TokenPress):
    name = "h2o"
    budget: str = "uniform"
    group_reduce: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduce must be one of {', '.join(GROUP_REDUCTIONS)}, got {self.group_reduce!r}")

    def watch_prefill(self, prefix_length: int, length: int) -> ReceivedAttention:
        return ReceivedAttention(length, first_query=0)

    def score(self, run: ScoringInput) -> Scores:
        received = received_attention(run, first_query=0)
        return [
            received.per_kv_head(i, layer.keys.shape[1], run.prefix_length, self.group_reduce)
            for i, layer in enumerate(run.cache.layers)
        ]
