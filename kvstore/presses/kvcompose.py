"""KVCompose: structured eviction, the same number of kept tokens for every head of a layer.

Token scores come from another press (`scorer`, KVzip by default: query-agnostic, max-pooled over
the reconstruction "task" tokens) and are stabilised by adding `head_mean` times the mean over the
layer's heads. Each head then ranks its own tokens; composite token j of a layer is every head's
j-th best token, worth the mean of their scores; the most important composites across all layers
are kept (`kvstore.presses.budget.composite_budget`). So layers get adaptive budgets while each layer stays
a plain [kv_heads, n_l, head_dim] tensor any engine can use.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.engine.attention import AttentionObserver
from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.registry import PRESSES, register

# Token presses whose scores do not rank tokens on their own (the full cache, head-level allocation, itself).
_NOT_SCORERS = ("kvcompose", "none", "kvzip_head")


@register
@dataclass
class KVComposePress(TokenPress):
    name = "kvcompose"
    budget: str = "composite"
    scorer: str = "kvzip"
    head_mean: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        usable = sorted(
            name for name, cls in PRESSES.items() if name not in _NOT_SCORERS and issubclass(cls, TokenPress)
        )
        if self.scorer not in usable:
            raise ValueError(f"kvcompose scorer must be one of {', '.join(usable)}, got {self.scorer!r}")

    def _scorer(self) -> TokenPress:
        return PRESSES[self.scorer](compression_ratio=self.compression_ratio)

    def watch_prefill(self, prefix_length: int, length: int) -> AttentionObserver | None:
        return self._scorer().watch_prefill(prefix_length, length)

    def score(self, run: ScoringInput) -> Scores:
        scores = self._scorer().score(run)
        return [s.float() + self.head_mean * s.float().mean(dim=0, keepdim=True) for s in scores]
