"""Scores -> keep masks.

Budgets: one global threshold across layers and heads, the same with a per-layer floor ("floored",
KVzip's default), a per-head uniform count, PyramidKV's per-layer pyramid, or KVCompose's composite
tokens (equal counts per head, layer-adaptive). The structured ones reduce to "head h of layer l keeps
its top c[l, h] scores"; `keep_top` does that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Scores = list[torch.Tensor]  # per layer: [kv_heads, doc_tokens]
Masks = list[torch.Tensor]  # per layer: [kv_heads, doc_tokens] bool


def kept_count(total: int, ratio: float) -> int:
    """Pairs kept when `ratio` of `total` is removed (at least one when anything is there)."""
    return min(total, max(1 if total else 0, round((1.0 - ratio) * total)))


# Share of its even budget that every layer keeps under "floored", whatever the global threshold says.
LAYER_FLOOR = 0.1


def _top_overall(scores: Scores, count: int) -> Masks:
    """The `count` highest scores of all layers and heads together (one global threshold)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    keep_flat = torch.zeros_like(flat, dtype=torch.bool)
    keep_flat[flat.topk(count).indices] = True
    return [part.view_as(s) for part, s in zip(keep_flat.split([s.numel() for s in scores]), scores, strict=True)]


def _floored(scores: Scores, populations: list[int], ratio: float, floor: float = LAYER_FLOOR) -> Masks:
    """Keep (1 - ratio) of all `populations`, each layer first keeping its own best `floor` x its share.

    A layer's population is its pair count, or the pairs still alive after an earlier chain stage.
    """
    promoted = []
    for layer_scores, population in zip(scores, populations, strict=True):
        flat = layer_scores.flatten().float()
        top = flat.topk(int(floor * kept_count(population, ratio))).indices
        promoted.append(flat.index_fill(0, top, float("inf")).view_as(layer_scores))
    return _top_overall(promoted, kept_count(sum(populations), ratio))


def global_budget(scores: Scores, ratio: float) -> Masks:
    """Keep the top (1 - ratio) of all scores together: layers and heads get different budgets."""
    return _top_overall(scores, kept_count(sum(s.numel() for s in scores), ratio))


def floored_budget(scores: Scores, ratio: float, floor: float = LAYER_FLOOR) -> Masks:
    """The global threshold, but every layer first keeps its own best `floor` x (1 - ratio) of its pairs.

    A pure global threshold can leave whole layers with nearly nothing: layers whose attention is
    diffuse while the model repeats the document score low everywhere, yet questions route through
    them (SmolLM2 at 0.9 removed: layers 16 and 19 kept no pair of the needle and answers lost a
    digit). The floor is Ada-KV's safeguard applied per layer; heads within a layer still compete.
    """
    return _floored(scores, [s.numel() for s in scores], ratio, floor)


def uniform_budget(scores: Scores, ratio: float) -> Masks:
    """Keep the top (1 - ratio) of each head's own scores: every head keeps the same count."""
    masks = []
    for layer_scores in scores:
        keep = torch.zeros_like(layer_scores, dtype=torch.bool)
        top = layer_scores.float().topk(kept_count(layer_scores.shape[-1], ratio), dim=-1).indices
        masks.append(keep.scatter_(-1, top, True))
    return masks


def keep_top(layer_scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[heads, tokens] mask keeping each head's top `counts[h]` scores (stable: ties go to earlier tokens)."""
    order = layer_scores.float().argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(layer_scores.shape[-1], device=layer_scores.device)
    wanted = ranks[None, :] < counts.to(layer_scores.device)[:, None]
    return torch.zeros_like(layer_scores, dtype=torch.bool).scatter_(-1, order, wanted)


def _largest_remainder(shares: torch.Tensor, total: int, cap: int) -> list[int]:
    """Round non-negative real `shares` (each <= cap, summing to `total`) to integers with the same sum."""
    counts = shares.floor().long().clamp(max=cap)
    missing = total - int(counts.sum())
    if missing > 0:
        room = (shares - counts).masked_fill(counts >= cap, float("-inf"))
        counts[room.argsort(descending=True, stable=True)[:missing]] += 1
    return counts.tolist()


def pyramid_counts(n_layers: int, tokens: int, kept: int, beta: float = 20.0) -> list[int]:
    """Tokens kept per head in each layer: PyramidKV's arithmetic sequence, summing to `kept`.

    Top layer k[m-1] = kept / (beta * m), bottom k[0] = 2 * kept / m - k[m-1], linear in between.
    A layer cannot keep more than `tokens`: the overflow of capped layers is spread over the others
    in proportion to their pyramid shares, so the sum stays exact.
    """
    if beta < 1.0:
        raise ValueError(f"pyramid beta must be >= 1 (the top layer cannot outgrow the bottom), got {beta}")
    if not 0 <= kept <= n_layers * tokens:
        raise ValueError(f"cannot keep {kept} of {n_layers} x {tokens} tokens")
    top = kept / (beta * n_layers)
    bottom = 2.0 * kept / n_layers - top
    if n_layers == 1:
        shares = torch.full((1,), float(kept), dtype=torch.float64)
    else:
        shares = torch.linspace(bottom, top, n_layers, dtype=torch.float64)
    capped = torch.zeros(n_layers, dtype=torch.bool)
    while bool((shares > tokens + 1e-9).any()):
        capped |= shares > tokens
        excess = float((shares - tokens).clamp(min=0).sum())
        shares = shares.clamp(max=tokens)
        free = shares.masked_fill(capped, 0.0)
        if float(free.sum()) <= 0.0:
            break
        shares = shares + excess * free / free.sum()
    return _largest_remainder(shares, kept, tokens)


def pyramid_budget(scores: Scores, ratio: float, beta: float = 20.0) -> Masks:
    """Each head of layer l keeps its top pyramid_counts[l] tokens (lower layers keep more)."""
    tokens = scores[0].shape[-1]
    counts = pyramid_counts(len(scores), tokens, kept_count(len(scores) * tokens, ratio), beta)
    return [keep_top(s, torch.full((s.shape[0],), n)) for s, n in zip(scores, counts, strict=True)]


def composite_counts(scores: Scores, kept: int) -> list[int]:
    """Composite tokens kept per layer, `kept` in all: KVCompose's layer-adaptive global allocation.

    Composite token j of a layer is made of every head's j-th best token; its importance is the mean
    over heads of those j-th best scores (non-increasing in j). The `kept` most important composites
    across all layers are kept, so each layer keeps a prefix of its composites.
    """
    importance = torch.stack([s.float().sort(dim=-1, descending=True).values.mean(dim=0) for s in scores])
    chosen = importance.flatten().argsort(descending=True, stable=True)[:kept]
    return torch.bincount(chosen // importance.shape[1], minlength=len(scores)).tolist()


def composite_budget(scores: Scores, ratio: float) -> Masks:
    """Every head of layer l keeps its own top n_l tokens: a plain per-layer tensor of n_l aligned slots."""
    counts = composite_counts(scores, kept_count(len(scores) * scores[0].shape[-1], ratio))
    return [keep_top(s, torch.full((s.shape[0],), n)) for s, n in zip(scores, counts, strict=True)]


BUDGETS: dict[str, Callable[[Scores, float], Masks]] = {
    "global": global_budget,
    "floored": floored_budget,
    "uniform": uniform_budget,
    "pyramid": pyramid_budget,
    "composite": composite_budget,
}
# Budgets that can select among the survivors of an earlier stage (the others impose their own structure).
SURVIVOR_BUDGETS = ("global", "floored", "uniform")


def select(scores: Scores, ratio: float, budget: str = "global") -> Masks:
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    return BUDGETS[budget](scores, ratio)


def select_among(scores: Scores, ratio: float, budget: str, alive: Masks) -> Masks:
    """Remove `ratio` of the pairs still `alive` (globally, with the layer floor, or of each head's survivors).

    This is what a later stage of a press chain does: the kept fraction multiplies.
    """
    if budget not in SURVIVOR_BUDGETS:
        raise ValueError(f"budget {budget!r} cannot select among survivors: use one of {', '.join(SURVIVOR_BUDGETS)}")
    lowest = torch.finfo(torch.float32).min  # alive pairs outrank dead ones even when scored -inf
    masked = [
        torch.where(a, s.float().nan_to_num(neginf=lowest), float("-inf")) for s, a in zip(scores, alive, strict=True)
    ]
    if budget == "uniform":
        counts = [torch.tensor([kept_count(int(n), ratio) for n in a.sum(-1)]) for a in alive]
        return [keep_top(s, c) for s, c in zip(masked, counts, strict=True)]
    if budget == "floored":
        return _floored(masked, [int(a.sum()) for a in alive], ratio)
    return _top_overall(masked, kept_count(int(sum(int(a.sum()) for a in alive)), ratio))
