"""What presses are, by what they remove, and what they see: a prefilled context.

* `TokenPress`: scores every document KV pair (`score`); a budget turns scores into keep masks.
* `ChannelPress`: evicts no token; picks which key channels of each head are stored for the pairs
  the token presses kept (ThinK). Its ratio is a fraction of key channels.
* `PressChain` (presses/chain.py): token presses in sequence, optionally ending with a channel press.

Every press is a small dataclass; `params()` is part of the content-addressed id and blob header.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache

from kvstore.config import check_ratio
from kvstore.engine.attention import AttentionObserver, observing
from kvstore.engine.models import LoadedModel
from kvstore.engine.prefill import prefill
from kvstore.presses.budget import BUDGETS, Masks, Scores, select

Channels = list[torch.Tensor]  # per layer: int32 [kv_heads, kept_channels], ascending per head


@dataclass
class ScoringInput:
    """A prefilled context as a press sees it: the document starts at `prefix_length`."""

    loaded: LoadedModel
    cache: DynamicCache
    input_ids: torch.Tensor  # [1, T]
    prefix_length: int
    prefill_observer: AttentionObserver | None = None  # what the press watched during prefill, if anything
    progress: Callable[[int], None] | None = None  # told the document tokens scored so far, by presses that can

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


def prefill_context(
    loaded: LoadedModel,
    document: str | list[int],
    press: Press | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> ScoringInput:
    """Frame and prefill a document (text, or its token ids) letting `press` watch if it wants.

    `on_chunk` hears the context tokens prefilled so far, after each chunk."""
    frame = loaded.frame
    input_ids = frame.context_ids(document)
    if input_ids.shape[1] == len(frame.head_ids):
        raise ValueError("the document is empty after tokenization")
    observer = press.watch_prefill(len(frame.head_ids), input_ids.shape[1]) if press is not None else None
    with observing(observer) if observer is not None else nullcontext():
        cache = prefill(loaded.model, input_ids, on_chunk=on_chunk)
    return ScoringInput(loaded, cache, input_ids, len(frame.head_ids), observer)


@dataclass
class Press:
    """A compression policy: keep masks over the document's pairs, then (optionally) key channels.

    `compression_ratio` is checked here, once, for every press; `budgets` lists the budgets the press
    accepts (`name@budget` in a spec).
    """

    name: ClassVar[str] = "base"
    budgets: ClassVar[tuple[str, ...]] = ()
    compression_ratio: float = 0.0
    budget: str = ""

    def __post_init__(self) -> None:
        self.compression_ratio = check_ratio(self.compression_ratio, f"{self.name} ratio")
        if self.budgets and self.budget not in self.budgets:
            raise ValueError(f"{self.name} accepts the budget(s) {', '.join(self.budgets)}, not {self.budget!r}")

    @property
    def memory_ratio(self) -> float:
        """Fraction of the document's K/V memory this press removes (the pair ratio for token presses)."""
        return self.compression_ratio

    def watch_prefill(self, prefix_length: int, length: int) -> AttentionObserver | None:
        """Presses that score from the prefill's own attention (H2O, SnapKV, TOVA) return an observer."""
        return None

    def keep_masks(self, run: ScoringInput) -> Masks:
        raise NotImplementedError

    def key_channels(self, run: ScoringInput, doc_keep: Masks) -> Channels | None:
        """Key channels to store per (layer, head) once `doc_keep` is chosen; None keeps them all."""
        return None

    def params(self) -> dict[str, object]:
        """Everything that changes the output: part of the content-addressed id and the blob header."""
        return {"press": self.name, **asdict(self)}


@dataclass
class TokenPress(Press):
    """Subclasses override `score`; higher scores are kept. Ratio = fraction of document pairs removed."""

    budgets: ClassVar[tuple[str, ...]] = tuple(BUDGETS)
    budget: str = "global"

    def score(self, run: ScoringInput) -> Scores:
        raise NotImplementedError

    def keep_masks(self, run: ScoringInput) -> Masks:
        if self.compression_ratio == 0.0:
            return run.keep_all()
        return self.masks_from_scores(self.score(run), run)

    def masks_from_scores(self, scores: Scores, run: ScoringInput) -> Masks:
        """Scores -> keep masks under this ratio and budget; a press with its own budget rule overrides this.

        Kept separate from `score` so one scoring pass can serve several ratios (see kvstore.eval).
        """
        return select(scores, self.compression_ratio, self.budget)


@dataclass
class ChannelPress(Press):
    """Evicts no token; `key_channels` picks the stored key channels. Ratio = fraction of key channels removed."""

    def keep_masks(self, run: ScoringInput) -> Masks:
        """Every document pair: a channel press evicts no token."""
        return run.keep_all()

    def key_channels(self, run: ScoringInput, doc_keep: Masks) -> Channels | None:
        raise NotImplementedError
