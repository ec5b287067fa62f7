"""A press chain: eviction presses applied in sequence, each removing its ratio of what is left.

The first stage that removes anything keeps its own masks (any budget, structured ones included).
Every later stage scores the full context with its own rule and removes its ratio of the survivors,
globally or per head (`kvstore.presses.budget.select_among`), so the kept fraction is the product of the parts:
removing r1 then r2 keeps (1 - r1)(1 - r2). Later stages must use a "global" or "uniform" budget:
structured budgets (pyramid, composite, head-level) only make sense on the full context.

A channel press (ThinK) removes key channels, not tokens: it must come last, `keep_masks` skips
it, and `key_channels` runs it on the pairs the token stages kept. The
chain's ratio is the fraction of the document's K/V memory removed, 1 - prod(1 - memory_ratio):
the pair ratio for token stages, half the channel ratio for ThinK (values keep every channel), so
kvzip:0.75+think:0.25 keeps 0.25 * (1 - 0.125) of the K/V bytes and reports 0.78125.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from kvstore.engine.attention import AttentionObserver
from kvstore.presses.base import ChannelPress, Channels, Press, ScoringInput, TokenPress
from kvstore.presses.budget import SURVIVOR_BUDGETS, Masks, select_among


@dataclass
class FanOut:
    """Shows every prefill attention call to each stage's observer; none of them computes the output."""

    observers: list[AttentionObserver | None] = field(default_factory=list)

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        outputs = [o.observe(layer_idx, query, key, value, scaling) for o in self.observers if o is not None]
        return next((out for out in outputs if out is not None), None)


def _check_stage(stage: object, first: bool, last: bool) -> None:
    if isinstance(stage, ChannelPress):
        if not last:
            raise ValueError(
                f"{stage.name!r} prunes key channels of the pairs the token stages keep: put it last in the chain"
            )
        return
    if not isinstance(stage, TokenPress):
        raise ValueError(f"a press chain stage must be a single token or channel press, got {stage!r}")
    if not first and stage.budget not in SURVIVOR_BUDGETS:
        raise ValueError(
            f"{stage.name!r} uses the {stage.budget!r} budget, which only applies to the full context: "
            f"put it first in the chain (later stages need a {' or '.join(SURVIVOR_BUDGETS)} budget)"
        )


@dataclass
class PressChain(Press):
    name = "chain"
    budgets = ("chain",)
    budget: str = "chain"
    stages: tuple[Press, ...] = ()

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a press chain needs at least one stage")
        super().__post_init__()
        self.stages = tuple(self.stages)
        active = [i for i, s in enumerate(self.stages) if s.compression_ratio > 0.0 and isinstance(s, TokenPress)]
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            _check_stage(stage, first=not active or i <= active[0], last=i == last)
        kept = math.prod(1.0 - stage.memory_ratio for stage in self.stages)
        self.compression_ratio = 1.0 - kept

    def watch_prefill(self, prefix_length: int, length: int) -> FanOut | None:
        observers = [stage.watch_prefill(prefix_length, length) for stage in self.stages]
        return FanOut(observers) if any(o is not None for o in observers) else None

    def _stage_runs(self, run: ScoringInput) -> list[ScoringInput]:
        """Each stage sees the run with its own prefill observer (or none: it will replay if it needs one)."""
        fan_out = run.prefill_observer
        if isinstance(fan_out, FanOut) and len(fan_out.observers) == len(self.stages):
            return [replace(run, prefill_observer=o) for o in fan_out.observers]
        return [replace(run, prefill_observer=None) for _ in self.stages]

    def keep_masks(self, run: ScoringInput) -> Masks:
        masks = None
        for stage, stage_run in zip(self.stages, self._stage_runs(run), strict=True):
            if stage.compression_ratio == 0.0 or not isinstance(stage, TokenPress):
                continue
            if masks is None:
                masks = stage.keep_masks(stage_run)
            else:
                masks = select_among(stage.score(stage_run), stage.compression_ratio, stage.budget, masks)
        return masks if masks is not None else run.keep_all()

    def key_channels(self, run: ScoringInput, doc_keep: Masks) -> Channels | None:
        """The channel stage's choice among the pairs the token stages kept (None without one)."""
        stage, stage_run = self.stages[-1], self._stage_runs(run)[-1]
        return stage.key_channels(stage_run, doc_keep) if isinstance(stage, ChannelPress) else None

    def params(self) -> dict[str, object]:
        return {
            "press": self.name,
            "compression_ratio": self.compression_ratio,
            "stages": [stage.params() for stage in self.stages],
        }
