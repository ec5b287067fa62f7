"""StreamingLLM: keep the first document tokens (attention sinks) and the most recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.budget import Scores
from kvstore.presses.base import ScorerPress, ScoringInput


@dataclass
class StreamingLLMPress(ScorerPress):
    name = "streaming"
    n_sink: int = 4
    budget: str = "uniform"

    def score(self, run: ScoringInput) -> Scores:
        recency = torch.arange(run.doc_length, dtype=torch.float32) / max(1, run.doc_length)
        recency[: self.n_sink] = 2.0  # sinks outrank every recent token
        return [recency.to(s.device).expand_as(s).clone() for s in run.zeros()]
