"""Ranking stored contexts (document parts included) for a question: BM25 over their text, with bm25s.

Texts live next to the index (`kvstore.storage.texts`), so a search reads no blob. One BM25 index
covers every stored context with a text; it is built once per process and rebuilt only when the set
of stored ids changes (reading only the new ids' records and texts), never for a filter: a filtered
search (one model's contexts, one document's parts) ranks over the whole index with the others
masked out, so a long-lived process (the server) keeps its one index across retrievals and `ask DOC`
part selections alike. Scores therefore use the whole store's term statistics. An unchanged store
costs a search one listing of ids; `benchmarks/search_bench.py` times builds and queries.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import bm25s
import numpy as np

from kvstore.decode.answer import Source
from kvstore.errors import InputError
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextStore


@dataclass(frozen=True)
class SearchHit(Source):
    """One ranked context (a `Source` with its BM25 score; 0: no query word in it) and its record."""

    score: float = 0.0
    record: ContextRecord = field(kw_only=True, repr=False)


def _tokenize(texts: Sequence[str]) -> bm25s.tokenization.Tokenized:
    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False)


def _indexed(texts: Sequence[str]) -> bm25s.BM25:
    bm25 = bm25s.BM25()
    bm25.index(_tokenize(texts), show_progress=False)
    return bm25


def _ranked(
    bm25: bm25s.BM25, size: int, question: str, k: int, mask: np.ndarray | None = None
) -> list[tuple[int, float]]:
    found, scores = bm25.retrieve(_tokenize([question]), k=min(k, size), show_progress=False, weight_mask=mask)
    return list(zip(found[0].tolist(), [float(x) for x in scores[0].tolist()], strict=True))


def rank_texts(texts: Sequence[str], question: str, k: int | None = None) -> list[tuple[int, float]]:
    """(index, BM25 score) of the `k` texts (default all) that best match `question`, best first."""
    return _ranked(_indexed(texts), len(texts), question, k or len(texts)) if texts else []


@dataclass(frozen=True)
class _Corpus:
    """The BM25 index of one set of stored ids: swapped whole, so readers never see half a rebuild."""

    stored: frozenset[str]  # every stored id it was built for (those without a text included)
    records: tuple[ContextRecord, ...] = ()  # the indexed contexts (those with a text), in index order
    bm25: bm25s.BM25 | None = None


MANY = 64  # more new ids than this: one pipelined listing of every record beats one read per id


class ContextSearch:
    """BM25 over the stored contexts' texts; one per store, safe to share between threads."""

    def __init__(self, store: ContextStore):
        """Records and texts are read once per id and cached; the index is rebuilt only when the stored ids change."""
        self.store = store
        self._records: dict[str, ContextRecord] = {}  # every stored id seen: content ids, so cached for good
        self._texts: dict[str, str] = {}
        self._corpus = _Corpus(frozenset())
        self._lock = threading.Lock()

    def _current(self) -> _Corpus:
        """The index over every stored context with a text, as of now (one id listing when unchanged)."""
        stored = frozenset(self.store.index.ids())
        if stored != self._corpus.stored:
            with self._lock:
                if stored != self._corpus.stored:
                    self._corpus = self._rebuilt(stored)
        return self._corpus

    def _rebuilt(self, stored: frozenset[str]) -> _Corpus:
        """The index of `stored`, reading only the records and texts of ids not seen before."""
        new = [i for i in stored if i not in self._records]
        fetched = self.store.list() if len(new) > MANY else [r for r in map(self.store.get, new) if r is not None]
        self._records = {i: r for i, r in self._records.items() if i in stored} | {
            r.id: r for r in fetched if r.id in stored
        }
        kept = {i: t for i, t in self._texts.items() if i in stored}
        self._texts = kept | self.store.texts.get_many([i for i in stored if i not in kept])  # new, or textless
        indexed = tuple(self._records[i] for i in sorted(self._records) if i in self._texts)
        return _Corpus(stored, indexed, _indexed([self._texts[r.id] for r in indexed]) if indexed else None)

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
        corpus = self._current()
        mask = None if where is None else np.array([where(r) for r in corpus.records], dtype=np.float32)
        if corpus.bm25 is None or (mask is not None and not mask.any()):
            return []
        hits = []
        for index, score in _ranked(corpus.bm25, len(corpus.records), question, k, mask):
            if score <= 0.0:
                break
            r = corpus.records[index]
            hits.append(SearchHit(r.id, r.source, r.part, r.parts, score, record=r))
        return hits

    def text(self, context_id: str) -> str | None:
        """A stored context's text (cached), or None if it was stored without one."""
        if context_id not in self._texts:
            self._texts.update(self.store.texts.get_many([context_id]))
        return self._texts.get(context_id)
