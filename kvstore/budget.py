"""Scores -> keep masks. One global threshold across layers and heads, or a per-head uniform budget."""

from __future__ import annotations

from collections.abc import Callable

import torch

Scores = list[torch.Tensor]  # per layer: [kv_heads, doc_tokens]
Masks = list[torch.Tensor]  # per layer: [kv_heads, doc_tokens] bool


def kept_count(total: int, ratio: float) -> int:
    """Pairs kept when `ratio` of `total` is removed (at least one when anything is there)."""
    return min(total, max(1 if total else 0, round((1.0 - ratio) * total)))


def global_budget(scores: Scores, ratio: float) -> Masks:
    """Keep the top (1 - ratio) of all scores together: layers and heads get different budgets."""
    flat = torch.cat([s.flatten().float() for s in scores])
    keep_flat = torch.zeros_like(flat, dtype=torch.bool)
    keep_flat[flat.topk(kept_count(flat.numel(), ratio)).indices] = True
    return [part.view_as(s) for part, s in zip(keep_flat.split([s.numel() for s in scores]), scores, strict=True)]


def uniform_budget(scores: Scores, ratio: float) -> Masks:
    """Keep the top (1 - ratio) of each head's own scores: every head keeps the same count."""
    masks = []
    for layer_scores in scores:
        keep = torch.zeros_like(layer_scores, dtype=torch.bool)
        top = layer_scores.float().topk(kept_count(layer_scores.shape[-1], ratio), dim=-1).indices
        masks.append(keep.scatter_(-1, top, True))
    return masks


BUDGETS: dict[str, Callable[[Scores, float], Masks]] = {"global": global_budget, "uniform": uniform_budget}


def select(scores: Scores, ratio: float, budget: str = "global") -> Masks:
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression ratio must be in [0, 1), got {ratio}")
    return BUDGETS[budget](scores, ratio)
