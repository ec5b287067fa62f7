"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph, ...) on obstore: ``s3://bucket/prefix``.

Each put is atomic: a one-object blob is one PUT with If-None-Match (so it never replaces a blob
another writer stored), a tree (a zarr group) is its parts, the root ``zarr.json`` last and
conditional, so an interrupted tree has no root and is no blob. Loads are ranged or whole GETs into
memory (no local cache folder: see docs/BENCHMARKS.md for what that costs per blob).

Credentials come only from the standard AWS sources: the AWS_* environment variables (also
AWS_ENDPOINT_URL for MinIO or a local server), else the AWS config and credentials files (through
boto3, when installed: profiles, SSO, instance roles). They are never stored, logged or printed:
messages name the bucket and object, never a key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from kvstore.errors import InputError, import_extra
from kvstore.storage.backends import TREE_ROOT, WHOLE, BackendUnavailableError, Entry, check_name, check_total
from kvstore.storage.blob import BlobMissingError

RETRIES = {"max_retries": 3, "retry_timeout": timedelta(seconds=20)}
TIMEOUTS = {"connect_timeout": "5s", "timeout": "300s"}
FETCHERS = 16  # parallel GETs when a tree's parts are read


def from_url(url: str) -> S3Backend:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise InputError(f"unsupported object store URL {url!r}: use s3://bucket/prefix")
    return S3Backend(parts.netloc, parts.path.strip("/"))


def _credentials() -> dict[str, Any]:
    """The AWS config files' credentials when the environment names none (obstore reads AWS_* itself)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return {}
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:  # no boto3: obstore's own chain (instance metadata, ...)
        return {}
    with contextlib.suppress(Exception):  # no profile configured: obstore's own chain
        return {"credential_provider": Boto3CredentialProvider()}
    return {}


@contextlib.contextmanager
def _reaching(where: str) -> Iterator[None]:
    """obstore's errors as kvstore's: a missing object, or an unreachable / refusing store, in one line."""
    import obstore.exceptions as errors

    try:
        yield
    except FileNotFoundError as exc:
        raise BlobMissingError(f"blob {where} does not exist") from exc
    except (errors.PermissionDeniedError, errors.UnauthenticatedError) as exc:
        raise BackendUnavailableError(f"the object store refused access to {where}: {_first_line(exc)}") from exc
    except errors.BaseError as exc:
        raise BackendUnavailableError(f"cannot reach the object store for {where}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@dataclass(frozen=True)
class S3Source:
    """A blob in the bucket: one object, or a tree of objects under `{name}/`."""

    name: str
    backend: S3Backend
    sizes: Mapping[str, int]  # part -> bytes, as found when opened

    path = None  # nothing local to memory-map

    @property
    def location(self) -> str:
        return self.backend.location(self.name)

    def _key(self, part: str) -> str:
        return self.name if part == WHOLE else f"{self.name}/{check_name(part)}"

    def read(self, part: str = WHOLE, start: int | None = None, end: int | None = None) -> bytes:
        obstore = self.backend.obstore
        key = self._key(part)
        with _reaching(self.backend.location(key)):
            if start is None and end is None:
                return bytes(obstore.get(self.backend.store, key).bytes())
            size = self.sizes.get(part)
            if size is None:
                size = obstore.head(self.backend.store, key)["size"]
            start, end = min(start or 0, size), min(size if end is None else end, size)
            return bytes(obstore.get_range(self.backend.store, key, start=start, end=end)) if end > start else b""

    def read_parts(self, limit: int | None = None) -> dict[str, bytes]:
        check_total(sum(self.sizes.values()), limit, self.location)
        with ThreadPoolExecutor(FETCHERS) as pool:
            return dict(zip(self.sizes, pool.map(self.read, self.sizes), strict=True))


class S3Backend:
    """Blobs under `s3://bucket/prefix/<shard>/<name>`."""

    def __init__(self, bucket: str, prefix: str = ""):
        self.obstore = import_extra("obstore", "s3")
        from obstore.store import S3Store

        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        client = {**TIMEOUTS, "allow_http": endpoint.startswith("http://")}
        self.store = S3Store(
            bucket, prefix=prefix or None, client_options=client, retry_config=RETRIES, **_credentials()
        )

    def location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _head(self, key: str) -> int | None:
        """Size of one object, None when absent."""
        try:
            with _reaching(self.location(key)):
                return int(self.obstore.head(self.store, key)["size"])
        except BlobMissingError:
            return None

    def _tree(self, name: str) -> dict[str, int]:
        """Parts under `{name}/` and their sizes."""
        with _reaching(self.location(name)):
            return {
                item["path"][len(name) + 1 :]: int(item["size"])
                for batch in self.obstore.list(self.store, prefix=f"{name}/")
                for item in batch
            }

    def exists(self, name: str) -> bool:
        check_name(name)
        return self._head(name) is not None or self._head(f"{name}/{TREE_ROOT}") is not None

    def size(self, name: str) -> int:
        whole = self._head(check_name(name))
        return whole if whole is not None else sum(self._tree(name).values())

    def open(self, name: str) -> S3Source:
        whole = self._head(check_name(name))
        if whole is not None:
            return S3Source(name, self, {WHOLE: whole})
        parts = self._tree(name)
        if TREE_ROOT not in parts:
            raise BlobMissingError(f"blob {self.location(name)} does not exist")
        return S3Source(name, self, parts)

    def _put(self, key: str, data: bytes, create: bool) -> bool:
        import obstore.exceptions as errors

        try:
            with _reaching(self.location(key)):
                self.obstore.put(self.store, key, data, mode="create" if create else "overwrite")
        except BackendUnavailableError as exc:
            if isinstance(exc.__cause__, errors.AlreadyExistsError | errors.PreconditionError):
                return False
            raise
        return True

    def put(self, name: str, parts: Mapping[str, bytes]) -> bool:
        check_name(name)
        if list(parts) == [WHOLE]:
            return self._put(name, parts[WHOLE], create=True)
        if self.exists(name):
            return False
        for part, data in parts.items():
            if part != TREE_ROOT:
                self._put(f"{name}/{check_name(part)}", data, create=False)
        return self._put(f"{name}/{TREE_ROOT}", parts[TREE_ROOT], create=True)

    def delete(self, name: str) -> int:
        check_name(name)
        whole = self._head(name)
        keys = {name: whole} if whole is not None else {f"{name}/{p}": n for p, n in self._tree(name).items()}
        root = f"{name}/{TREE_ROOT}"
        ordered = sorted(keys, key=lambda k: k != root)  # the root first: the tree stops being a blob at once
        with _reaching(self.location(name)):
            for key in ordered:
                self.obstore.delete(self.store, key)
        return sum(keys.values())

    def list(self) -> Iterator[Entry]:
        found: dict[str, list[Any]] = {}  # name -> [size, newest mtime, complete]
        with _reaching(self.url):
            for batch in self.obstore.list(self.store):
                for item in batch:
                    path = item["path"]
                    pieces = path.split("/")
                    if len(pieces) < 2 or len(pieces[0]) != 2:
                        continue  # store.json and anything that is not in a shard
                    name = "/".join(pieces[:2])
                    entry = found.setdefault(name, [0, 0.0, False])
                    entry[0] += int(item["size"])
                    entry[1] = max(entry[1], item["last_modified"].timestamp())
                    entry[2] = entry[2] or path == name or path == f"{name}/{TREE_ROOT}"
        for name in sorted(found):
            size, mtime, complete = found[name]
            yield Entry(name, size, mtime, complete)

    def read_meta(self, name: str) -> bytes | None:
        try:
            with _reaching(self.location(name)):
                return bytes(self.obstore.get(self.store, check_name(name)).bytes())
        except BlobMissingError:
            return None

    def put_meta(self, name: str, data: bytes) -> bool:
        return self._put(check_name(name), data, create=True)
