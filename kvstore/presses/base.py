"""What every press is: a dataclass with a compression ratio that scores the document's KV pairs.

A press may also be a channel stage (ThinK): it evicts no token but picks which key channels of
each head are stored, after the token selection (`key_channels`). Its ratio is then a fraction of
key channels, and `memory_ratio` says what any press removes in K/V memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache

from kvstore.attention import AttentionObserver
from kvstore.budget import Masks, Scores, select
from kvstore.models import LoadedModel

Channels = list[torch.Tensor]  # per layer: int32 [kv_heads, kept_channels], ascending per head


@dataclass
class ScoringInput:
    """A prefilled context as a press sees it: the document starts at `prefix_length`."""

    loaded: LoadedModel
    cache: DynamicCache
    input_ids: torch.Tensor  # [1, T]
    prefix_length: int
    prefill_observer: AttentionObserver | None = None  # what the press watched during prefill, if anything

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def doc_length(self) -> int:
        return self.length - self.prefix_length

    def keep_all(self) -> Masks:
        """A keep mask over every document pair (the full cache)."""
        return [torch.ones_like(s, dtype=torch.bool) for s in self.zeros()]

    def zeros(self) -> Scores:
        """One zero score per (layer, kv head, document token), on the cache's device."""
        return [
            layer.keys.new_zeros(layer.keys.shape[1], self.doc_length, dtype=torch.float32)
            for layer in self.cache.layers
        ]


@dataclass
class ScorerPress:
    """Subclasses override `score`; higher scores are kept. Ratio = fraction of document pairs removed.

    A channel stage (ThinK) scores no token: its ratio is the fraction of key channels removed.
    """

    name: ClassVar[str] = "base"
    channel_stage: ClassVar[bool] = False  # True: prunes key channels after the token stages, evicts no token
    compression_ratio: float = 0.0
    budget: str = "global"

    @property
    def memory_ratio(self) -> float:
        """Fraction of the document's K/V memory this press removes (the pair ratio for token presses)."""
        return self.compression_ratio

    def score(self, run: ScoringInput) -> Scores:
        raise NotImplementedError

    def watch_prefill(self, prefix_length: int, length: int) -> AttentionObserver | None:
        """Presses that score from the prefill's own attention (H2O, SnapKV, TOVA) return an observer."""
        return None

    def keep_masks(self, run: ScoringInput) -> Masks:
        if self.compression_ratio == 0.0:
            return run.keep_all()
        return self.masks_from_scores(self.score(run), run)

    def masks_from_scores(self, scores: Scores, run: ScoringInput) -> Masks:
        """Scores -> keep masks under this ratio and budget; a press with its own budget rule overrides this.

        Kept separate from `score` so one scoring pass can serve several ratios (see kvstore.eval).
        """
        return select(scores, self.compression_ratio, self.budget)

    def key_channels(self, run: ScoringInput, doc_keep: Masks) -> Channels | None:
        """Key channels to store per (layer, head) once `doc_keep` is chosen; None keeps them all."""
        return None

    def params(self) -> dict[str, object]:
        """Everything that changes the output: part of the content-addressed id and the blob header."""
        return {"press": self.name, **asdict(self)}
