"""What prefill observers share: which query rows of a chunk they watch, and replaying an unwatched prefill."""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

from kvstore.engine.attention import observing
from kvstore.engine.prefill import prefill
from kvstore.presses.base import ScoringInput


class WindowObserver(Protocol):
    """An observer of the context's query rows from `first_query` on, for a context of `length` tokens."""

    length: int
    first_query: int

    def __init__(self, length: int, first_query: int) -> None: ...


Observer = TypeVar("Observer", bound=WindowObserver)


def watched_rows(query: torch.Tensor, key: torch.Tensor, length: int, first_query: int) -> tuple[int, int] | None:
    """(absolute position of this chunk's first query row, first watched row), or None if none is watched.

    Calls beyond the context (KVzip's reconstruction, questions) are never watched.
    """
    if query.shape[0] != 1:
        raise ValueError("prefill attention is observed for a single sequence (batch size 1)")
    k_len = key.shape[2]
    start = k_len - query.shape[2]
    first = max(start, first_query)
    if k_len > length or first >= k_len:
        return None
    return start, first


def watched_or_replayed(run: ScoringInput, kind: type[Observer], first_query: int) -> Observer:
    """The run's own observer when it watched these rows; otherwise replay the prefill under a new one.

    Replaying costs one more prefill (into a throwaway cache) but lets a press score a context that
    was prefilled without it watching (eval sweeps, chains built after the fact).
    """
    observer = run.prefill_observer
    if isinstance(observer, kind) and (observer.length, observer.first_query) == (run.length, first_query):
        return observer
    observer = kind(run.length, first_query)
    with observing(observer):
        prefill(run.loaded.model, run.input_ids)
    return observer
