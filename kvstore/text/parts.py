"""A document's token ids -> parts that fit the model's window, cut at the best boundary in reach.

The document is tokenized once (with character offsets); parts are slices of those ids, so the
ids a part is stored under are exactly the ids it was prefilled from. A part ends at the last
paragraph break that keeps it within `max_tokens`; failing that at the last sentence end, then
the last space, then anywhere (a table or code with no space at all). Whitespace-only tokens at a
part's edges are dropped. A document that fits is one part: the ids of the whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# Boundary kinds, best first: the text just before a token that starts after one of them.
_BOUNDARIES = (re.compile(r"\n\s*\n\s*$"), re.compile(r"[.!?][\"')\]]*\s+$"), re.compile(r"\s$"))


@dataclass(frozen=True)
class Part:
    """One part of a document: its text (for search and display) and its token ids (what is stored)."""

    text: str
    ids: list[int]


def _boundary_rank(text: str, offsets: list[tuple[int, int]], index: int) -> int:
    """How good a cut before token `index` is: 0 paragraph, 1 sentence, 2 space, 3 anywhere."""
    begin, end = offsets[index]
    token = text[begin:end]
    # Tokenizers differ in whether a token's offsets include its leading whitespace: count both.
    before = text[max(0, begin - 8) : begin] + token[: len(token) - len(token.lstrip())]
    for rank, pattern in enumerate(_BOUNDARIES):
        if pattern.search(before):
            return rank
    return len(_BOUNDARIES)


def split_tokens(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[Part]:
    """Tokenize `text` once and cut it into parts of at most `max_tokens` ids (see module docstring)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(ids):
        stop = len(ids) if len(ids) - start <= max_tokens else _best_cut(text, offsets, start, start + max_tokens)
        spans.append((start, stop))
        start = stop
    parts = []
    for first, last in spans:
        while first < last and not text[offsets[first][0] : offsets[first][1]].strip():
            first += 1
        while last > first and not text[offsets[last - 1][0] : offsets[last - 1][1]].strip():
            last -= 1
        if first < last:
            parts.append(Part(text[offsets[first][0] : offsets[last - 1][1]].strip(), ids[first:last]))
    return parts


def _best_cut(text: str, offsets: list[tuple[int, int]], start: int, limit: int) -> int:
    """The token index in (start, limit] to end a part at: the latest cut of the best rank found."""
    best, best_rank = limit, len(_BOUNDARIES)
    for index in range(limit, start, -1):
        rank = _boundary_rank(text, offsets, index)
        if rank < best_rank:
            best, best_rank = index, rank
            if rank == 0:
                break
    return best
