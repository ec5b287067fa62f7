"""Where blobs live: named objects with atomic put, get, list and delete. One module per backend.

A backend knows nothing of contexts, ids or formats. It stores a blob under a name such as
``3f/3f2a...c1.safetensors`` as one object, or as a tree of parts (a zarr group:
``{name}/zarr.json``, ``{name}/layer.0/keys/c/0/0``...). A put is atomic: readers see the whole
blob or nothing, and a put never replaces a blob already stored under that name (it returns False
and the caller adopts what is there). Parts are written in the order given; the last one completes
the blob (a zarr group's root ``zarr.json``, which carries the header), so a tree that stops
halfway has no root and no reader takes it for a blob.

The backend is chosen by URL (`open_backend`): none -> the local folder ``KVSTORE_HOME/blobs``
(`kvstore.storage.backends.local`), ``s3://bucket/prefix`` -> an S3-compatible object store
(`kvstore.storage.backends.s3`). A new backend is one module plus one line in `SCHEMES`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from kvstore.errors import InputError, UnavailableError
from kvstore.storage.blob import BlobCorruptError, BlobPathError

SCHEMES = {"file": "kvstore.storage.backends.local", "s3": "kvstore.storage.backends.s3"}
WHOLE = ""  # the part name of a blob stored as one object
TREE_ROOT = "zarr.json"  # the part that completes a tree (a zarr group's root metadata): written last
_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_TEMP = "._tmp-"


class BackendUnavailableError(UnavailableError):
    """The object store cannot be reached, or refused access; the message names it (never a credential)."""


@dataclass(frozen=True)
class Entry:
    """One stored blob (or leftover) as a listing shows it."""

    name: str  # e.g. "3f/3f2a...c1.safetensors"
    size: int  # bytes, all parts together
    mtime: float  # epoch seconds of the newest part
    complete: bool  # False: a temp file or a tree without its last part (an interrupted put)
    link: bool = False  # a symbolic link sitting where a blob belongs (never followed)


class Source(Protocol):
    """A stored blob, opened for reading."""

    name: str
    location: str  # printable: a path or a URL, never a credential

    @property
    def path(self) -> Path | None:
        """The local file or directory, so formats can memory-map it and read parts lazily; None when remote."""

    def read(self, part: str = WHOLE, start: int | None = None, end: int | None = None) -> bytes:
        """One part's bytes (the whole blob by default), or only [start, end): a header costs no tensor reads."""

    def read_parts(self, limit: int | None = None) -> dict[str, bytes]:
        """Every part of a tree, by part name: one pass for formats that need all of them; refused
        (BlobCorruptError) before anything is read when they add up to more than `limit` bytes."""


def check_total(size: int, limit: int | None, location: str) -> None:
    """Refuse to fetch a blob larger than what its checked header allows."""
    if limit is not None and size > limit:
        raise BlobCorruptError(f"blob {location} holds {size:,} bytes, more than its header allows ({limit:,})")


class Backend(Protocol):
    """Named objects, each put atomic and never replacing what is there."""

    url: str  # printable location of the backend root

    def put(self, name: str, parts: Mapping[str, bytes]) -> bool:
        """Store the parts atomically, in order (the last completes the blob); False, changing nothing, when the
        name is taken: content-addressed names make what is there the same blob, so the caller adopts it."""

    def open(self, name: str) -> Source:
        """The blob for reading; BlobMissingError when absent, BlobPathError when it is a link (never followed)."""

    def exists(self, name: str) -> bool:
        """Whether a blob is stored under the name (a put there would return False)."""

    def size(self, name: str) -> int:
        """Bytes of a blob, all parts together: the size a record states, known without reading the blob."""

    def list(self) -> Iterator[Entry]:
        """Every blob and leftover under the two-character shards, with what gc needs to judge it."""

    def delete(self, name: str) -> int:
        """Remove the blob; the bytes freed (0 when absent, so a second gc or a racing one is harmless)."""

    def location(self, name: str) -> str:
        """A printable path or URL for messages, never carrying a credential."""

    def read_meta(self, name: str) -> bytes | None:
        """A small top-level object (store.json, the store's identity), None if absent."""

    def put_meta(self, name: str, data: bytes) -> bool:
        """Create it unless present; True if ours: two processes claiming one store end up with one identity."""


def check_name(name: str) -> str:
    """A relative object name with no empty, `.` or `..` component: it cannot climb out of its root."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or any(p in (".", "..") for p in name.split("/")):
        raise BlobPathError(f"{name!r} is not a valid blob name (relative, no '..', no leading '/')")
    return name


def temp_name(name: str, token: str) -> str:
    """A sibling name for an unfinished put of `name`: same shard, hidden, never taken for a blob.

    `token` (unique per put) must contain no '-'.
    """
    shard, _, leaf = name.rpartition("/")
    return f"{shard}/{_TEMP}{leaf}-{token}" if shard else f"{_TEMP}{leaf}-{token}"


def temp_target(name: str) -> str | None:
    """The blob name an unfinished put's temp name was for (None if `name` is not a temp name)."""
    shard, _, leaf = name.rpartition("/")
    if not leaf.startswith(_TEMP):
        return None
    target = leaf[len(_TEMP) :].rsplit("-", 1)[0]
    return f"{shard}/{target}" if shard else target


def open_backend(url: str | None, home: Path) -> Backend:
    """The backend a blobs URL names: None -> the local folder `home/blobs`; a folder, file:// or s3:// URL."""
    if not url:
        return _module("file").LocalBackend(Path(home) / "blobs")
    scheme = urlsplit(url).scheme or "file"
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise InputError(f"unsupported blobs URL {url!r}: use a folder or one of {known}")
    return _module(scheme).from_url(url)


def _module(scheme: str) -> Any:
    return importlib.import_module(SCHEMES[scheme])
