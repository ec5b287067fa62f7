"""PyramidKV: SnapKV's scores under a pyramid of per-layer budgets (lower layers keep more).

With m layers and k_total tokens kept per head over all layers: the top layer keeps
k_total / (beta * m), the bottom 2 * k_total / m minus that, and the layers in between follow the
arithmetic sequence (see `kvstore.presses.budget.pyramid_counts`). Every head of a layer keeps the same count.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.presses.base import ScoringInput
from kvstore.presses.budget import Masks, Scores, pyramid_budget
from kvstore.presses.registry import register
from kvstore.presses.snapkv import SnapKVPress


@register
@dataclass
class PyramidKVPress(SnapKVPress):
    name = "pyramidkv"
    budgets = ("pyramid",)  # use snapkv for other budgets
    budget: str = "pyramid"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1.0:
            raise ValueError(f"pyramidkv beta must be >= 1, got {self.beta}")

    def masks_from_scores(self, scores: Scores, run: ScoringInput) -> Masks:
        return pyramid_budget(scores, self.compression_ratio, self.beta)
