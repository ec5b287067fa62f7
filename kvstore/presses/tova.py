"""TOVA: keep what the last context token attends to, one ranking shared by all heads of a layer.

Score of a document key = attention from the last context token, averaged over every query head
of the layer (so all KV heads of a layer keep the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.received import ReceivedAttention, received_attention
from kvstore.presses.registry import register


@register
@dataclass
class TOVAPress(TokenPress):
    name = "tova"
    budget: str = "uniform"

    def watch_prefill(self, prefix_length: int, length: int) -> ReceivedAttention:
        return ReceivedAttention(length, first_query=length - 1)

    def score(self, run: ScoringInput) -> Scores:
        received = received_attention(run, first_query=run.length - 1)
        scores = []
        for i, layer in enumerate(run.cache.layers):
            layer_mean = received.sums[i][:, run.prefix_length :].mean(dim=0)
            scores.append(layer_mean.expand(layer.keys.shape[1], -1).clone())
        return scores
