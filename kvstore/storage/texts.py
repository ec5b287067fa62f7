"""The text of each stored context, kept in the index's Redis so that search reads no blob.

One string key per context id under the index's versioned prefix (``{prefix}text:{id}``), written
by ingest just before the record commits and removed with the record. Content ids are content
addresses, so a text never changes once written: readers may cache it by id.

A text is written before its record (so search never misses a stored part), which leaves a text
without a record when the ingest fails or its process dies in between. The writer therefore holds
the text's lease (``{prefix}text-writing:{id}``, `kvstore.storage.lease`) from the text's write until
its record has committed, and gc deletes a text without a record only while holding that lease
(`kvstore.storage.maintenance`): never the text of an ingest in progress.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from kvstore.errors import UnavailableError
from kvstore.storage.index import ContextIndex, unavailable_as
from kvstore.storage.lease import Lease


class ContextTexts:
    """Texts of stored contexts, by id, next to the index's records."""

    def __init__(self, index: ContextIndex):
        self.index = index

    def _key(self, context_id: str) -> str:
        return f"{self.index.prefix}text:{context_id}"

    def put(self, context_id: str, text: str) -> None:
        with unavailable_as(self.index.location):
            self.index.client.set(self._key(context_id), text)

    def get_many(self, ids: Sequence[str]) -> dict[str, str]:
        """Texts of these ids (ids without a stored text are left out)."""
        if not ids:
            return {}
        with unavailable_as(self.index.location):
            values = self.index.client.mget([self._key(i) for i in ids])
        return {i: v for i, v in zip(ids, values, strict=True) if v is not None}

    def ids(self) -> list[str]:
        """Every id with a stored text, record or not (an incremental SCAN: Redis is never blocked)."""
        start = len(self._key(""))
        pattern = _glob_escape(self._key("")) + "*"
        with unavailable_as(self.index.location):
            return [key[start:] for key in self.index.client.scan_iter(match=pattern, count=1000)]

    def delete(self, context_id: str) -> None:
        with unavailable_as(self.index.location):
            self.index.client.delete(self._key(context_id))

    def lease(self, context_id: str) -> Lease:
        """The lease on one id's text: a writer's from its text's write until its record commits, or gc's."""
        return Lease(self.index.client, f"{self.index.prefix}text-writing:{context_id}", self.index.lease_ttl_s)

    @contextmanager
    def writing(self, context_id: str, wait_s: float) -> Iterator[None]:
        """Hold the text's lease (waiting up to `wait_s` for another writer or gc) while a text is written
        and its record committed."""
        lease = self.lease(context_id)
        with unavailable_as(self.index.location):
            held = lease.wait(wait_s)
        if not held:
            raise UnavailableError(f"could not store context {context_id[:12]}: its text was held for {wait_s:.0f} s")
        with lease:
            yield


def _glob_escape(text: str) -> str:
    """`text` matched literally in a Redis MATCH pattern (a prefix may hold glob characters)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
