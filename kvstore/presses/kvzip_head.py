"""KVzip, head level: context-independent eviction decided once per model from a calibration text.

Head importance = the largest KVzip score a (layer, KV head) gives any token of a fixed calibration
text (`CALIBRATION_TEXT`), computed once per model and process. At compression time, with N
document tokens, H heads in all and K = kept_count(H * N, ratio) pairs to keep, every head keeps
its sinks + recent window (s = min(N, n_sink + window) tokens) and the most important heads keep
everything:

* if K >= H * s: the top F = (K - H*s) // (N - s) heads keep all N tokens, the next head extends its
  recent window by the remainder, all other heads keep exactly s;
* otherwise every head keeps K // H sinks-then-recent tokens, the K % H most important one more.

So the kept count is exactly K, and each head is either full or streaming (one boundary head partial).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.engine.models import LoadedModel
from kvstore.presses.base import ScoringInput, TokenPress, prefill_context
from kvstore.presses.budget import Masks, Scores, keep_top, kept_count
from kvstore.presses.kvzip import KVzipPress
from kvstore.presses.registry import register
from kvstore.presses.streaming import sink_recency_scores

CALIBRATION_TEXT = (
    "The lighthouse keeper wrote in her logbook every evening. On the third of March the wind turned north, "
    "the supply boat arrived two days late, and the lamp needed a new wick. She counted forty-two gulls on the "
    "eastern rocks and noted that the tide tables printed in the almanac were wrong by eleven minutes. "
    "Her brother, who ran the bakery in the harbour town, sent a letter asking whether she would come for the "
    "spring festival; the letter mentioned that the mayor had promised a new road, that the school had a new "
    "teacher from the capital, and that the price of flour had risen again. In the margin she kept a list of "
    "ships: the Marigold, a cargo steamer bound for Lisbon; the Osprey, a fishing trawler with a red hull; and "
    "a small yacht called Patience whose owner waved every time he passed. When the fog came in on Friday she "
    "sounded the horn every thirty seconds for nine hours, and the next morning she found a brass compass "
    "washed up below the steps, its needle still pointing true. She decided to keep it on the windowsill until "
    "somebody came to claim it, and wrote the date, the weather and the word compass at the bottom of the page."
)

_IMPORTANCE: dict[tuple[str, str], torch.Tensor] = {}


def head_importance(loaded: LoadedModel, text: str = CALIBRATION_TEXT) -> torch.Tensor:
    """[layers, kv_heads] float32 on CPU: max KVzip score of each head over the calibration text (cached)."""
    key = (loaded.fingerprint, loaded.tokenizer_fingerprint) if text == CALIBRATION_TEXT else None
    if key in _IMPORTANCE:
        return _IMPORTANCE[key]
    run = prefill_context(loaded, text)
    importance = torch.stack([s.amax(dim=-1) for s in KVzipPress().score(run)]).float().cpu()
    if key is not None:
        _IMPORTANCE[key] = importance
    return importance


def head_counts(importance: torch.Tensor, tokens: int, kept: int, streaming: int) -> torch.Tensor:
    """[layers, kv_heads] document tokens each head keeps (rule in the module docstring); sums to `kept`."""
    n_heads = importance.numel()
    order = importance.flatten().argsort(descending=True, stable=True)
    counts = torch.zeros(n_heads, dtype=torch.long)
    streaming = min(tokens, streaming)
    if kept >= n_heads * streaming:
        counts[:] = streaming
        spare, extra_per_full = kept - n_heads * streaming, tokens - streaming
        full = min(n_heads, spare // extra_per_full) if extra_per_full else 0
        counts[order[:full]] = tokens
        if full < n_heads:
            counts[order[full]] += spare - full * extra_per_full
    else:
        counts[:] = kept // n_heads
        counts[order[: kept % n_heads]] += 1
    return counts.view_as(importance)


@register
@dataclass
class KVzipHeadPress(TokenPress):
    name = "kvzip_head"
    budgets = ("heads",)  # whole heads, ranked by calibrated importance (masks_from_scores)
    budget: str = "heads"
    n_sink: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0 or self.window < 0:
            raise ValueError("kvzip_head needs n_sink >= 0 and window >= 0")

    def score(self, run: ScoringInput) -> Scores:
        """Order within a head: sinks first, then the most recent tokens (the budget decides how many)."""
        return sink_recency_scores(run, self.n_sink)

    def masks_from_scores(self, scores: Scores, run: ScoringInput) -> Masks:
        """Whole heads keep everything, the rest sinks + recent window, ranked by head importance."""
        importance = head_importance(run.loaded)
        kept = kept_count(importance.numel() * run.doc_length, self.compression_ratio)
        counts = head_counts(importance, run.doc_length, kept, self.n_sink + self.window)
        return [keep_top(s, c) for s, c in zip(scores, counts, strict=True)]
