"""Which index a store belongs to: one identity, written into both when the store is created.

The index keeps it under ``{prefix}identity``; the blobs keep it in ``store.json`` at the backend
root (``KVSTORE_HOME/blobs/store.json``, or the bucket prefix), and every blob written since also
names it. Every open compares the two, so a store is never used with the wrong index: gc run
without the `--redis-url` its records live in, or against a Redis that restarted empty, would
otherwise see no records and take every blob for an orphan. `kvstore reindex` (adopt=True) is
the one way to give a lost index its store back.
"""

from __future__ import annotations

import json
import time
import uuid

from kvstore.errors import DataError
from kvstore.storage.backends import Backend
from kvstore.storage.index import ContextIndex

IDENTITY_OBJECT = "store.json"
# How long an open waits for a concurrent creator of the same store to finish writing its identity.
CREATION_WAIT_S = 5.0


class StoreMismatchError(DataError):
    """The blobs and the index were not made for each other (or the index lost its records)."""


def read_identity(backend: Backend) -> str | None:
    raw = backend.read_meta(IDENTITY_OBJECT)
    if raw is None:
        return None
    try:
        identity = json.loads(raw)["index"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreMismatchError(f"{backend.location(IDENTITY_OBJECT)} is damaged: {exc}") from exc
    return str(identity)


def _has_blobs(backend: Backend) -> bool:
    return any(entry.complete for entry in backend.list())


def bind(index: ContextIndex, backend: Backend, adopt: bool = False) -> str:
    """The identity the index and the blobs share, creating it for a new store; refuses a mismatch.

    adopt: the index has lost its identity (and records): take the blobs' one (what reindex does).
    """
    ours, theirs = read_identity(backend), index.identity()
    if theirs and not ours and index.count() == 0:  # perhaps another process is creating this very store
        ours = _written_soon(backend)
    if ours and theirs and ours != theirs:
        raise StoreMismatchError(
            f"the blobs in {backend.url} belong to index {ours[:12]}, but the index at {index.location} is "
            f"{theirs[:12]}: check --home / --blobs / --redis-url (KVSTORE_HOME, KVSTORE_BLOBS, KVSTORE_REDIS_URL)"
        )
    if ours and theirs:
        return ours
    if ours:
        if not adopt:
            raise StoreMismatchError(
                f"the index at {index.location} does not know the blobs in {backend.url} (they belong to index "
                f"{ours[:12]}): is this the --redis-url / KVSTORE_REDIS_URL their records were written to? "
                "If that index was lost (a Redis restarted empty), rebuild it from the blobs: kvstore reindex"
            )
        return _claimed(index, backend, ours)
    if theirs:
        raise StoreMismatchError(
            f"the index at {index.location} belongs to other blobs (index {theirs[:12]}), not to {backend.url}: "
            "give the --home / --blobs (KVSTORE_HOME, KVSTORE_BLOBS) its contexts were stored in"
        )
    if not adopt and index.count() == 0 and _has_blobs(backend):
        raise StoreMismatchError(
            f"{backend.url} holds blobs but the index at {index.location} is empty and neither knows the other: "
            "if their index was lost, rebuild it from the blobs: kvstore reindex"
        )
    return _claimed(index, backend, uuid.uuid4().hex)


def _written_soon(backend: Backend) -> str | None:
    """The blobs' identity once a concurrent creator has written it (it claims the index first, then
    writes the blobs' side a moment later); None if none appears within CREATION_WAIT_S."""
    deadline = time.monotonic() + CREATION_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if (identity := read_identity(backend)) is not None:
            return identity
    return None


def _claimed(index: ContextIndex, backend: Backend, identity: str) -> str:
    """Write `identity` into both unless each has one already (another process raced us): the one they hold."""
    held = index.claim_identity(identity)
    backend.put_meta(IDENTITY_OBJECT, json.dumps({"index": held, "created": time.time()}).encode())
    stored = read_identity(backend)
    if stored != held:
        raise StoreMismatchError(f"the blobs in {backend.url} were just claimed by another index ({stored})")
    return held
