"""The text of each stored context, kept in the index's Redis so that search reads no blob.

One string key per context id under the index's versioned prefix (``{prefix}text:{id}``), written
by ingest before the record commits and removed with the record. Content ids are content
addresses, so a text never changes once written: readers may cache it by id.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.storage.index import ContextIndex, unavailable_as


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

    def delete(self, context_id: str) -> None:
        with unavailable_as(self.index.location):
            self.index.client.delete(self._key(context_id))
