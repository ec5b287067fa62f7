"""Ranking stored contexts (document parts included) for a question: BM25 over their text, with bm25s.

Texts live next to the index (`kvstore.storage.texts`), so a search reads no blob. Texts are
immutable per content id and cached in the process; the BM25 index is rebuilt only when the set of
contexts searched changes (thousands of contexts take milliseconds to index).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import bm25s

from kvstore.errors import InputError
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextStore


@dataclass(frozen=True)
class SearchHit:
    """One ranked context: which one, where it came from, and its BM25 score (0: no query word in it)."""

    id: str
    source: str
    part: int
    parts: int
    score: float
    record: ContextRecord


def _tokenize(texts: Sequence[str]) -> bm25s.tokenization.Tokenized:
    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False)


def _indexed(texts: Sequence[str]) -> bm25s.BM25:
    bm25 = bm25s.BM25()
    bm25.index(_tokenize(texts), show_progress=False)
    return bm25


def _ranked(bm25: bm25s.BM25, size: int, question: str, k: int) -> list[tuple[int, float]]:
    found, scores = bm25.retrieve(_tokenize([question]), k=min(k, size), show_progress=False)
    return list(zip(found[0].tolist(), [float(x) for x in scores[0].tolist()], strict=True))


def rank_texts(texts: Sequence[str], question: str, k: int | None = None) -> list[tuple[int, float]]:
    """(index, BM25 score) of the `k` texts (default all) that best match `question`, best first."""
    return _ranked(_indexed(texts), len(texts), question, k or len(texts)) if texts else []


class ContextSearch:
    """BM25 over the stored contexts' texts; one per store, safe to share between threads."""

    def __init__(self, store: ContextStore):
        """Texts are read from the store once and cached; the BM25 index is rebuilt only when the stored ids change."""
        self.store = store
        self._texts: dict[str, str] = {}
        self._ids: tuple[str, ...] = ()
        self._bm25: bm25s.BM25 | None = None
        self._lock = threading.Lock()

    def _index_for(self, ids: tuple[str, ...]) -> tuple[bm25s.BM25 | None, tuple[str, ...]]:
        """The BM25 index over these contexts (those with a stored text) and the ids it ranks, in order."""
        with self._lock:
            if ids != self._ids:
                missing = [i for i in ids if i not in self._texts]
                self._texts.update(self.store.texts.get_many(missing))
                ids = tuple(i for i in ids if i in self._texts)
                self._bm25 = None
                if ids:
                    self._bm25 = _indexed([self._texts[i] for i in ids])
                self._ids = ids
            return self._bm25, self._ids

    def search(
        self, question: str, k: int = 4, where: Callable[[ContextRecord], bool] | None = None
    ) -> list[SearchHit]:
        """The `k` best contexts for `question` (optionally only records `where` accepts), best first.

        Contexts sharing no word with the question (BM25 score 0) are not returned.
        """
        if not question or not question.strip():
            raise InputError("empty search: give a question or some words to look for")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        records = {r.id: r for r in self.store.list() if where is None or where(r)}
        bm25, ids = self._index_for(tuple(sorted(records)))
        if bm25 is None:
            return []
        hits = []
        for index, score in _ranked(bm25, len(ids), question, k):
            if score <= 0.0:
                break
            record = records[ids[index]]
            hits.append(SearchHit(record.id, record.source, record.part, record.parts, score, record))
        return hits

    def text(self, context_id: str) -> str | None:
        """A stored context's text (cached), or None if it was stored without one."""
        if context_id not in self._texts:
            self._texts.update(self.store.texts.get_many([context_id]))
        return self._texts.get(context_id)
