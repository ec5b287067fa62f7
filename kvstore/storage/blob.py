"""The blob header and the blob errors: what wrote a blob and how to read it back, container-free.

A blob is one compressed context: a flat set of named tensors (see `kvstore.storage.payload`) plus
this header (`BlobHeader`), stored by a format (`kvstore.storage.formats`: safetensors or zarr v3)
into objects that a backend (`kvstore.storage.backends`) keeps. The checksum in the header is a
sha256 over the header (without the checksum field) and every tensor's name, dtype, shape and raw
bytes in name order, so it is independent of the container and catches a flipped byte anywhere.
Version 2 added the key channels (`BlobHeader.key_channels`, one count per layer, 0 = all).
Version 1 blobs have none and are still read; older readers refuse version 2 cleanly instead of
misreading pruned keys. Nothing is ever unpickled. Importing this module loads no torch, so the
index-only commands can read headers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.config import DEFAULT_GROUP_SIZE, bits_for
from kvstore.errors import DataError
from kvstore.kv.shape import MAX_TOKENS
from kvstore.storage.provenance import Origin

if TYPE_CHECKING:
    import torch

    from kvstore.kv.compressed import CompressedKV

FORMAT_VERSION = 2  # what this code writes
READABLE_VERSIONS = (1, 2)  # version 1: no key channel pruning (no `key_channels` in the header)
METADATA_KEY = "kvstore"  # safetensors metadata key / zarr group attribute holding the header JSON
RECORD_KEY = "kvstore.record"  # beside it: what the index record said (document, parts, index identity)
DTYPES = ("float32", "float16", "bfloat16")
# Bounds on what any header may declare, whatever model reads it (a model's own window is tighter).
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_GROUP_SIZE = 1 << 16
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class BlobError(DataError):
    """A blob cannot be used; the message says why and what to do."""


class BlobMissingError(BlobError, FileNotFoundError):
    """The blob file or directory does not exist."""


class BlobVersionError(BlobError):
    """Written with a blob format version this code does not read."""


class BlobModelError(BlobError):
    """Written by a different model (weights fingerprint) than the caller's."""


class BlobCorruptError(BlobError):
    """Unreadable, incomplete, or the checksum does not match the content."""


class BlobPathError(BlobError):
    """A blob location that would leave the store (a symlink, an absolute path, `..`): refused."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise BlobCorruptError(f"unsupported K/V dtype {name!r} in blob header")
    return name


@dataclass
class BlobHeader(Origin):
    """Everything needed to trust and decode a blob (its origin, then its layout), stored inside it as JSON."""

    dtype: str  # of the K/V the blob decodes to: float32 / float16 / bfloat16
    quant: str  # none / int8 / int4
    original_length: int
    prefix_length: int
    head_dim: int
    lengths: list[list[int]]  # [layer][kv head]: kept rows
    key_channels: list[int] = field(default_factory=list)  # [layer]: key channels stored per head, 0 = all
    group_size: int = DEFAULT_GROUP_SIZE
    checksum: str = ""  # sha256, filled in by the writer
    format_version: int = FORMAT_VERSION

    @classmethod
    def describe(
        cls,
        compressed: CompressedKV,
        *,
        model: str,
        model_fingerprint: str,
        tokenizer_fingerprint: str,
        press: dict[str, Any],
        quant: str = "none",
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> BlobHeader:
        """The header of a compressed context about to be written (checksum still empty)."""
        bits_for(quant)
        return cls(
            model=model,
            model_fingerprint=model_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint,
            dtype=dtype_name(compressed.layers[0].keys.dtype),
            press=json.loads(json.dumps(press, default=str)),
            quant=quant,
            original_length=compressed.original_length,
            prefix_length=compressed.prefix_length,
            head_dim=compressed.head_dim,
            lengths=[[int(n) for n in layer.lengths.tolist()] for layer in compressed.layers],
            key_channels=[
                0 if layer.key_channels is None else int(layer.key_channels.shape[1]) for layer in compressed.layers
            ],
            group_size=group_size,
        )

    def to_json(self) -> str:
        raw = asdict(self)
        if self.format_version == 1:  # version 1 headers had no key channels: keep their JSON (and checksum)
            raw.pop("key_channels")
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: object) -> BlobHeader:
        """Parse a stored header: the version is checked first, so future layouts are refused cleanly."""
        if not isinstance(raw, dict):
            raise BlobCorruptError("blob header is not a JSON object")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            readable = " and ".join(map(str, READABLE_VERSIONS))
            raise BlobVersionError(
                f"blob format version {version!r} is not supported (this kvstore reads versions {readable}); "
                "re-ingest the document"
            )
        try:
            header = cls(**raw)
            bits_for(header.quant)
        except (TypeError, ValueError) as exc:
            raise BlobCorruptError(f"blob header is damaged: {exc}") from exc
        check_dtype(header.dtype)
        header.check_structure()
        if json.loads(header.to_json()) != raw:  # a flipped byte that still parses: wrong types or keys
            raise BlobCorruptError("blob header is damaged: it does not re-serialize to itself")
        return header

    @classmethod
    def from_json(cls, text: str | None) -> BlobHeader:
        if not text:
            raise BlobCorruptError("blob has no kvstore header")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise BlobCorruptError(f"blob header is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def check_structure(self) -> None:
        """Refuse fields that contradict each other or declare more than a blob can hold, naming the field.

        Every size a reader allocates derives from these fields (`kvstore.storage.validate`), so
        bounding them here bounds what loading any blob can allocate.
        """
        length = self.original_length
        _check_int("original_length", length, 1, MAX_TOKENS)
        _check_int("prefix_length", self.prefix_length, 0, length)
        _check_int("head_dim", self.head_dim, 1, MAX_HEAD_DIM)
        _check_int("group_size", self.group_size, 1, MAX_GROUP_SIZE)
        if not isinstance(self.lengths, list) or not self.lengths or not all(isinstance(h, list) for h in self.lengths):
            raise BlobCorruptError("blob header field 'lengths' is not a list of per-layer lists")
        heads = len(self.lengths[0])
        if not 1 <= heads <= MAX_HEADS or any(len(layer) != heads for layer in self.lengths):
            raise BlobCorruptError(
                f"blob header field 'lengths' does not give every layer the same 1-{MAX_HEADS} heads"
            )
        for layer in self.lengths:
            for rows in layer:  # a head keeps each context position at most once
                _check_int("lengths", rows, 0, length)
        if self.format_version != 1:
            if not isinstance(self.key_channels, list) or len(self.key_channels) != self.layers:
                raise BlobCorruptError("blob header field 'key_channels' does not match its layers")
            for channels in self.key_channels:
                _check_int("key_channels", channels, 0, self.head_dim)

    @property
    def layers(self) -> int:
        return len(self.lengths)

    def pruned(self, layer: int) -> bool:
        """Whether `layer` stores only some key channels (and a `key_channels` tensor)."""
        return bool(self.key_channels) and self.key_channels[layer] > 0

    def key_width(self, layer: int) -> int:
        """Columns of `layer`'s stored keys."""
        return self.key_channels[layer] if self.pruned(layer) else self.head_dim


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise BlobCorruptError(f"blob header field {field!r} is {value!r}, outside [{low}, {high}]")


def record_text(info: dict[str, Any]) -> str:
    """The record info a blob keeps beside its header (for reindex), sealed by its own sha256."""
    body = json.dumps(info, sort_keys=True, separators=(",", ":"))
    return json.dumps({"info": info, "sha256": hashlib.sha256(body.encode()).hexdigest()}, sort_keys=True)


def parse_record(text: object) -> dict[str, Any]:
    """The record info of `record_text` ({} for blobs written before blobs kept one); refuses a damaged one."""
    if text is None:
        return {}
    try:
        sealed = json.loads(text)  # type: ignore[arg-type]
        info, digest = sealed["info"], sealed["sha256"]
        body = json.dumps(info, sort_keys=True, separators=(",", ":"))
        intact = isinstance(info, dict) and hashlib.sha256(body.encode()).hexdigest() == digest
    except (TypeError, ValueError, KeyError):
        intact = False
    if not intact:
        raise BlobCorruptError("blob record info is damaged (its sha256 does not match)")
    for key, kinds in _INFO_TYPES.items():  # resealing is easy: the types are checked, not trusted
        if key in info and (isinstance(info[key], bool) or not isinstance(info[key], kinds)):
            raise BlobCorruptError(f"blob record info field {key!r} is {info[key]!r}: the wrong type")
    return info


_INFO_TYPES: dict[str, Any] = {
    "index": str,
    "source": str,
    "document_sha256": str,
    "document_id": str,
    "part": int,
    "parts": int,
    "ratio_requested": int | float,
    "created": int | float,
}


def check_metadata(metadata: dict[str, Any], where: str) -> None:
    """A blob's metadata holds the header and the record info, nothing else (a flipped key name shows here)."""
    unexpected = sorted(set(metadata) - {METADATA_KEY, RECORD_KEY})
    if unexpected:
        raise BlobCorruptError(f"blob {where} has unexpected metadata {unexpected[:3]}")
