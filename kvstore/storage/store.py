"""ContextStore = blobs in a backend + records in the Redis index: put / get / load / find / list / delete.

Ids are content-addressed (sha256 of model fingerprint, token ids, press params and quantization),
so the same document ingested twice with the same settings is stored once. A blob's name is
derived from its id and format alone (``<id[:2]>/<id>.safetensors`` or ``.zarr``) and never read
back from a record, so an edited record cannot point the store at another file; the backend keeps
every name inside its root. Blobs live in the local folder ``KVSTORE_HOME/blobs`` or an object
store (`kvstore.storage.backends`), encoded by a format (`kvstore.storage.formats`).

Commit protocol: a writer takes the id's lease (`ContextIndex.lease`), writes the blob (the
backend's put is atomic and never replaces a blob), then the index record, which is the commit
marker, and releases the lease. A crash leaves at most an orphan blob or a temp file, invisible to
readers, which `gc` (`kvstore.storage.maintenance`) removes, never a record pointing at a partial
blob. Concurrent writers of one id wait on the lease: one blob and one record remain. A record
whose blob is missing or damaged is repaired by the next put of that id.

A store's blobs and its index share an identity (`kvstore.storage.identity`), checked on every
open. Importing this module loads no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.config import Settings, bits_for
from kvstore.errors import NotFoundError
from kvstore.kv.shape import KVShape
from kvstore.storage.backends import Backend, open_backend
from kvstore.storage.blob import ELEMENT_BYTES, BlobError, BlobHeader, BlobPathError, check_dtype
from kvstore.storage.formats import FORMATS, BlobFormat, format_of, get_format
from kvstore.storage.identity import bind
from kvstore.storage.index import KEY_PREFIX, ContextIndex, ContextRecord, unavailable_as
from kvstore.storage.private import private_dir, warn_if_shared
from kvstore.storage.provenance import DocumentRef, Origin, values_of
from kvstore.storage.texts import ContextTexts
from kvstore.storage.validate import Expected

if TYPE_CHECKING:
    import torch

    from kvstore.engine.models import LoadedModel
    from kvstore.kv.compressed import CompressedKV

WRITER_WAIT_S = 300.0  # how long a writer waits for another writer of the same id before giving up
_ID = re.compile(r"[0-9a-f]{64}")


class ContextNotFoundError(NotFoundError):
    """No record with this id in the index."""


def document_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def context_id(
    model_fingerprint: str,
    token_ids: torch.Tensor | np.ndarray | Sequence[int],
    press_params: dict[str, Any],
    quant: str,
) -> str:
    """Content address of a compressed context: what produced it, from which tokens, stored how."""
    if hasattr(token_ids, "cpu"):
        token_ids = token_ids.cpu()
    ids = np.asarray(token_ids).reshape(-1).astype("<i4")
    settings = json.dumps(
        {"model": model_fingerprint, "press": press_params, "quant": quant}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(settings.encode())
    digest.update(ids.tobytes())
    return digest.hexdigest()


def blob_name(context_id: str, blob_format: str) -> str:
    """Where a context's blob lives in any backend: derived from the id and the format, nothing else."""
    if not isinstance(context_id, str) or not _ID.fullmatch(context_id):
        raise BlobPathError(f"{context_id!r} is not a content id (64 hex digits): refused as a blob location")
    if blob_format not in FORMATS:
        raise BlobError(f"context {context_id[:12]} names an unknown blob format {blob_format!r}")
    return f"{context_id[:2]}/{context_id}{FORMATS[blob_format]}"


def parse_blob_name(name: str) -> tuple[str, str] | None:
    """(id, format) of a blob name made by `blob_name`; None for anything else."""
    shard, _, leaf = name.partition("/")
    cid, dot, _ = leaf.partition(".")
    try:
        blob_format = format_of(leaf)
    except BlobError:
        return None
    if not dot or not _ID.fullmatch(cid) or shard != cid[:2] or leaf != cid + FORMATS[blob_format]:
        return None
    return cid, blob_format


@dataclass
class ContextMeta(DocumentRef, Origin):
    """What the caller knows about a compressed context besides its tensors: its origin and its document."""

    @classmethod
    def for_model(cls, loaded: LoadedModel, press: dict[str, Any], **kwargs: Any) -> ContextMeta:
        """Meta for a context compressed by `loaded` with press params `press` (Press.params())."""
        return cls(loaded.name, loaded.fingerprint, loaded.tokenizer_fingerprint, press, **kwargs)

    @property
    def requested_ratio(self) -> float:
        """K/V memory fraction asked for: a press's `memory_ratio` when it differs from its ratio (ThinK)."""
        return float(self.press.get("memory_ratio", self.press.get("compression_ratio", 0.0)) or 0.0)


def record_info(meta: ContextMeta, identity: str) -> dict[str, Any]:
    """What a blob keeps of its record beside the header: enough for `reindex`, and its index's identity."""
    document = values_of(DocumentRef, meta)
    document["document_id"] = meta.document_id or meta.document_sha256
    return {"index": identity, **document, "ratio_requested": meta.requested_ratio, "created": time.time()}


def record_for(
    cid: str, header: BlobHeader, info: dict[str, Any], blob_format: str, size: int, location: str, created: float
) -> ContextRecord:
    """The index record of a stored blob, from its header and record info (what put and reindex write)."""
    kept = sum(sum(lengths) for lengths in header.lengths)
    kv_heads = len(header.lengths[0]) if header.lengths else 0
    total = header.original_length * kv_heads * header.layers
    kept_elements = sum(
        sum(lengths) * (header.key_width(i) + header.head_dim) for i, lengths in enumerate(header.lengths)
    )
    achieved = 1.0 - kept_elements / max(1, 2 * total * header.head_dim)
    return ContextRecord(
        id=cid,
        **values_of(Origin, header),
        **values_of(DocumentRef, DocumentRef.from_info(info)),
        original_length=header.original_length,
        prefix_length=header.prefix_length,
        kept_pairs=kept,
        total_pairs=total,
        ratio_requested=float(info.get("ratio_requested", 0.0)),
        ratio_achieved=round(achieved, 6),
        quant=header.quant,
        blob_format=blob_format,
        blob=location,
        bytes=size,
        full_bytes=total * header.head_dim * 2 * ELEMENT_BYTES[header.dtype],
        dtype=header.dtype,
        created=created,
        checksum=header.checksum,
    )


@dataclass
class StoreStats:
    """Totals over all records: what is stored vs what full caches of the same contexts would take."""

    contexts: int
    stored_bytes: int
    full_bytes: int
    context_tokens: int

    @property
    def saving(self) -> float:
        """Fraction of full-cache bytes not stored."""
        return 1.0 - self.stored_bytes / self.full_bytes if self.full_bytes else 0.0


class ContextStore:
    """Compressed contexts by content-addressed id: blobs in a backend, records in the index."""

    def __init__(
        self,
        home: Path,
        index: ContextIndex,
        blob_format: str = "safetensors",
        quant: str = "none",
        backend: Backend | None = None,
        adopt: bool = False,
        storage_dtype: str = "auto",
    ):
        """adopt: bind to blobs whose index lost its identity (`kvstore reindex` only);
        storage_dtype: the K/V dtype blobs are written in ("auto": the dtype they were computed in)."""
        self.home = private_dir(Path(home))
        self.index = index
        self.texts = ContextTexts(index)
        self.blob_format = get_format(blob_format).name
        self.quant = quant
        bits_for(quant)
        self.storage_dtype = storage_dtype if storage_dtype == "auto" else check_dtype(storage_dtype)
        self.backend = backend or open_backend(None, self.home)
        warn_if_shared(self.home)
        self.identity = bind(index, self.backend, adopt=adopt)

    @classmethod
    def open(cls, settings: Settings | None = None, prefix: str = KEY_PREFIX, adopt: bool = False) -> ContextStore:
        """The store of `settings.home`: blobs at `settings.blobs` (None: home/blobs), index at `settings.redis_url`."""
        settings = settings or Settings()
        private_dir(settings.home)
        backend = open_backend(settings.blobs, settings.home)
        index = ContextIndex.open(settings.redis_url, settings.home, prefix)
        try:
            return cls(
                settings.home, index, settings.blob_format, settings.quant, backend, adopt, settings.storage_dtype
            )
        except BaseException:
            index.close()
            raise

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------

    def put(
        self,
        compressed: CompressedKV,
        meta: ContextMeta,
        quant: str | None = None,
        blob_format: str | None = None,
    ) -> tuple[ContextRecord, bool]:
        """Store a compressed context once; (its record, whether this call created it).

        quant / blob_format default to the store's settings ("none" / "safetensors" unless configured).
        The id depends on neither the blob format nor the storage dtype (the K/V are cast to
        `storage_dtype` first): if the context is already stored in any of them with an intact
        blob, its existing record is returned.
        """
        quant = quant or self.quant
        bits_for(quant)
        if self.storage_dtype != "auto":
            from kvstore.storage.payload import parse_dtype

            compressed = compressed.to_dtype(parse_dtype(self.storage_dtype))
            if not compressed.finite:
                raise BlobError(f"K/V values exceed {self.storage_dtype}'s range: store them as bfloat16 or float32")
        fmt = get_format(blob_format or self.blob_format)
        cid = context_id(meta.model_fingerprint, compressed.token_ids, meta.press, quant)
        name = blob_name(cid, fmt.name)
        header = BlobHeader.describe(compressed, **values_of(Origin, meta), quant=quant)
        lease = self.index.lease(cid)
        with unavailable_as(self.index.location):
            waited = lease.wait(WRITER_WAIT_S)
        if not waited:
            raise BlobError(f"could not store context {cid[:12]}: another writer held it for {WRITER_WAIT_S:.0f} s")
        with lease:
            existing = self.index.get(cid)
            if existing is not None:
                if self.intact(existing, compressed.kv_shape):
                    return existing, False
                self.index.delete(cid, if_created=existing.created)  # its blob is gone or damaged: repair
                self._remove_blob(existing)
            info = record_info(meta, self.identity)
            stored, size = self._write_blob(cid, name, fmt, compressed, header, info)
            record = record_for(cid, stored, info, fmt.name, size, self.backend.location(name), time.time())
            if self.index.add(record):  # the commit point
                return record, True
            winner = self.index.get(cid)  # only if the lease lapsed under a stalled writer
            if winner is None:
                raise BlobError(f"could not store context {cid[:12]}: its record changed while it was written")
            return winner, False

    def _write_blob(
        self, cid: str, name: str, fmt: BlobFormat, compressed: CompressedKV, header: BlobHeader, info: dict
    ) -> tuple[BlobHeader, int]:
        """Publish the blob, or adopt one already there once it proves to be this id's content: (header, bytes)."""
        shape = compressed.kv_shape
        adopted = self._adopt(cid, name, fmt, shape)
        if adopted is not None:
            return adopted
        written, parts = fmt.encode(compressed, header, info)
        if not self.backend.put(name, parts):
            adopted = self._adopt(cid, name, fmt, shape)  # published meanwhile by a writer that lost its lease
            if adopted is None:
                raise BlobError(f"could not store context {cid[:12]}: its blob changed while it was written")
            return adopted
        return written, sum(len(data) for data in parts.values())

    def _adopt(self, cid: str, name: str, fmt: BlobFormat, shape: KVShape) -> tuple[BlobHeader, int] | None:
        """A blob already at `name` (left by a crash before its record): its header if it is `cid`'s content.

        Anyone who can write the store can plant a blob there: it is adopted only once it validates
        against the context being written (`shape`) and its own content hashes to `cid`.
        """
        if not self.backend.exists(name):
            return None
        try:
            source = self.backend.open(name)
            compressed, header = fmt.decode(source, Expected(shape=shape))
            if context_id(header.model_fingerprint, compressed.token_ids, header.press, header.quant) == cid:
                return header, self.backend.size(name)
        except BlobPathError:
            raise
        except BlobError:
            pass
        self.backend.delete(name)  # damaged, or another context's content at this id's address
        return None

    # -- reading ---------------------------------------------------------------------------------

    def get(self, context_id: str) -> ContextRecord | None:
        return self.index.get(context_id)

    def require(self, context_id: str) -> ContextRecord:
        record = self.index.get(context_id)
        if record is None:
            raise ContextNotFoundError(f"no stored context with id {context_id}")
        return record

    def load(self, context_id: str, model_fingerprint: str | None = None, shape: KVShape | None = None) -> CompressedKV:
        """The stored context, dequantized, once the blob proved usable (`kvstore.storage.validate`).

        model_fingerprint / shape: of the model that will decode it (checked when given); the blob
        must also carry its index record's checksum.
        """
        record = self.require(context_id)
        source = self.backend.open(blob_name(record.id, record.blob_format))
        expected = Expected(model_fingerprint, shape, record.checksum)
        return get_format(record.blob_format).decode(source, expected)[0]

    def intact(self, record: ContextRecord, shape: KVShape | None = None) -> bool:
        """Whether a record's blob is there with the record's header (shape given: and decodes validly as one)."""
        try:
            name = blob_name(record.id, record.blob_format)
            if not self.backend.exists(name):
                return False
            source = self.backend.open(name)
            fmt = get_format(record.blob_format)
            if shape is not None:
                fmt.decode(source, Expected(shape=shape, checksum=record.checksum))
                return True
            header = fmt.describe(source)[0]
        except BlobPathError:
            raise
        except BlobError:
            return False
        return header.checksum == record.checksum

    def find(
        self, document_sha256: str, model_fingerprint: str, press: dict[str, Any], quant: str | None = None
    ) -> list[ContextRecord]:
        """Stored contexts of a document under these settings (all parts, in part order): dedupe."""
        return self.index.find(document_sha256, model_fingerprint, press, quant or self.quant)

    def list(self, limit: int | None = None) -> list[ContextRecord]:
        """Newest first."""
        return self.index.list(limit)

    def stats(self) -> StoreStats:
        records = self.index.list()
        return StoreStats(
            contexts=len(records),
            stored_bytes=sum(r.bytes for r in records),
            full_bytes=sum(r.full_bytes for r in records),
            context_tokens=sum(r.original_length for r in records),
        )

    # -- removing --------------------------------------------------------------------------------

    def delete(self, context_id: str) -> bool:
        """Remove the record (uncommit first), then the blob; False if there was no record."""
        record = self.index.get(context_id)
        if record is None or not self.index.delete(context_id, if_created=record.created):
            return False
        self.texts.delete(context_id)
        try:
            self._remove_blob(record)
        except BlobPathError as exc:
            raise BlobPathError(f"removed the record of {context_id[:12]} but left its blob: {exc}") from exc
        return True

    def _remove_blob(self, record: ContextRecord) -> None:
        try:
            name = blob_name(record.id, record.blob_format)
        except BlobError:
            return  # a record that names no blob of ours: nothing of ours to remove
        self.backend.delete(name)
