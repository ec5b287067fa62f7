"""ThinK, question-agnostic: store only the key channels of each head that the window's queries use.

Score of channel c of a KV head = ||Q[:, c]||_2 * ||K[:, c]||_2, where Q stacks the post-RoPE
queries of the last `window_size` context tokens for every query head of the head's GQA group
(the question is not known yet, so the end of the context stands in for it, as in SnapKV) and K
holds the head's document keys that the token stages kept. Each head keeps its top
(1 - ratio) * head_dim channels; template-prefix rows are stored with the same channels.

The ratio is the fraction of KEY channels removed. Values keep every channel, so the K/V memory
kept is (1 - ratio / 2): that is `memory_ratio`, what chains and the store report. ThinK evicts no
token, so it runs after the token stages of a chain (`key_channels`) and alone keeps every pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.presses.base import ChannelPress, Channels, ScoringInput
from kvstore.presses.budget import Masks, kept_count
from kvstore.presses.registry import register
from kvstore.presses.watch import watched_or_replayed, watched_rows


@dataclass
class QueryWindow:
    """Per layer [Hq, head_dim] float32 sums of squared post-RoPE queries of rows >= first_query."""

    length: int
    first_query: int
    squares: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        rows = watched_rows(query, key, self.length, self.first_query)
        if rows is None:
            return None
        start, first = rows
        sums = query[0, :, first - start :].float().square().sum(dim=1)
        previous = self.squares.get(layer_idx)
        self.squares[layer_idx] = sums if previous is None else previous + sums
        return None

    def norms(self, layer_idx: int, kv_heads: int) -> torch.Tensor:
        """[kv_heads, head_dim]: the L2 norm of each channel over the window rows of the whole GQA group."""
        squares = self.squares[layer_idx]
        return squares.view(kv_heads, -1, squares.shape[-1]).sum(dim=1).sqrt()


def query_window(run: ScoringInput, first_query: int) -> QueryWindow:
    """Squared query sums of rows >= first_query: watched during the prefill, or replayed."""
    return watched_or_replayed(run, QueryWindow, first_query)


def channel_scores(query_norms: torch.Tensor, doc_keys: torch.Tensor, doc_keep: torch.Tensor) -> torch.Tensor:
    """[kv_heads, head_dim] ThinK scores from query norms and the kept rows of [kv_heads, T, head_dim] keys."""
    kept = doc_keep.to(device=doc_keys.device, dtype=torch.float32)[:, None, :]  # [H, 1, T]
    key_norms = torch.matmul(kept, doc_keys.float().square())[:, 0].sqrt()
    return query_norms.to(key_norms.device) * key_norms


def top_channels(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """int32 [heads, kept]: each head's `kept` best channels, ascending (ties go to lower channels)."""
    order = scores.float().argsort(dim=-1, descending=True, stable=True)[:, :kept]
    return order.sort(dim=-1).values.to(torch.int32)


@register
@dataclass
class ThinKPress(ChannelPress):
    """compression_ratio = fraction of each head's key channels removed; every head keeps the same count."""

    name = "think"
    budgets = ("uniform",)  # every head keeps the same channel count
    budget: str = "uniform"
    window_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1:
            raise ValueError("think needs window_size >= 1")

    @property
    def memory_ratio(self) -> float:
        """Keys lose `compression_ratio` of their channels, values none: half of that in K/V memory."""
        return self.compression_ratio / 2

    def first_query(self, prefix_length: int, length: int) -> int:
        """The window: the last `window_size` tokens, never reaching into the template prefix."""
        return max(prefix_length, length - self.window_size)

    def watch_prefill(self, prefix_length: int, length: int) -> QueryWindow:
        return QueryWindow(length, self.first_query(prefix_length, length))

    def key_channels(self, run: ScoringInput, doc_keep: Masks) -> Channels | None:
        if self.compression_ratio == 0.0:
            return None
        window = query_window(run, self.first_query(run.prefix_length, run.length))
        channels = []
        for i, (layer, keep) in enumerate(zip(run.cache.layers, doc_keep, strict=True)):
            keys = layer.keys[0, :, run.prefix_length :]  # [kv_heads, doc_tokens, head_dim]
            scores = channel_scores(window.norms(i, keys.shape[0]), keys, keep)
            channels.append(top_channels(scores, kept_count(keys.shape[-1], self.compression_ratio)))
        return channels

    def params(self) -> dict[str, object]:
        return {**super().params(), "memory_ratio": self.memory_ratio}
