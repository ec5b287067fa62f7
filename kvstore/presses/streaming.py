"""StreamingLLM: keep the first document tokens (attention sinks) and the most recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.registry import register


def sink_recency_scores(run: ScoringInput, n_sink: int) -> Scores:
    """Every head ranks the first `n_sink` document tokens first, then later tokens above earlier ones."""
    recency = torch.arange(run.doc_length, dtype=torch.float32) / max(1, run.doc_length)
    recency[:n_sink] = 2.0  # sinks outrank every recent token
    return [recency.to(s.device).expand_as(s).clone() for s in run.zeros()]


@register
@dataclass
class StreamingLLMPress(TokenPress):
    name = "streaming"
    n_sink: int = 4
    budget: str = "uniform"

    def score(self, run: ScoringInput) -> Scores:
        return sink_recency_scores(run, self.n_sink)
