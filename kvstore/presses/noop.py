"""The full cache: nothing is evicted (the reference every other press is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.budget import Scores
from kvstore.presses.base import ScorerPress, ScoringInput


@dataclass
class NoPress(ScorerPress):
    name = "none"

    def __post_init__(self) -> None:
        if self.compression_ratio != 0.0:
            raise ValueError("the 'none' press keeps everything: its ratio must be 0")

    def score(self, run: ScoringInput) -> Scores:
        return run.zeros()
