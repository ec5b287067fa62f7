"""POST /v1/contexts in process: a document is stored whole or not at all.

A long document is stored as several parts, one after the other. When part k fails, the parts this
request created before it are deleted again (record, blob and search text), so a failed request
stores nothing; the failing part leaves nothing of its own (`kvstore.ingest`). Parts that were
already stored before the request (the same text ingested earlier: deduplicated) stay, since they
belong to whoever stored them. A concurrent ingest of the same document in another process may
have been told meanwhile that a part this request created is stored; it will find it gone.
"""

from __future__ import annotations

import logging

from kvstore.client import KVStore
from kvstore.errors import KVStoreError
from kvstore.ingest import IngestedPart, ingest_text

log = logging.getLogger(__name__)


def ingest_whole(kv: KVStore, text: str, source: str) -> list[IngestedPart]:
    """Ingest `text` with the client's model, press and storage settings (as `KVStore.ingest_text`
    does); on failure, remove the parts this call created, then re-raise."""
    created: list[IngestedPart] = []
    try:
        return ingest_text(
            kv.model(),
            kv.store,
            text,
            kv.press(),
            source=source,
            quant=kv.settings.quant,
            blob_format=kv.settings.blob_format,
            on_part=lambda part: created.append(part) if part.created else None,
        )
    except BaseException:
        for part in created:
            try:
                kv.store.delete(part.record.id)
            except KVStoreError as exc:  # the original failure is the one to report; `kvstore rm` can finish
                log.warning("could not roll back part %s of a failed ingest: %s", part.record.id[:12], exc)
        raise
