"""The full cache: nothing is evicted (the reference every other press is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.registry import register


@register
@dataclass
class NoPress(TokenPress):
    name = "none"
    budgets = ("global",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compression_ratio != 0.0:
            raise ValueError("the 'none' press keeps everything: its ratio must be 0")

    def score(self, run: ScoringInput) -> Scores:
        return run.zeros()
