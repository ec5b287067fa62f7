"""safetensors blobs (the default): one object; the header JSON sits in its string metadata.

A blob a backend has as a local file is opened with `safe_open` (memory-mapped: the loaded K/V
are views of the file's pages, no copy); from an object store the header comes first (two ranged
reads: the safetensors layout is an 8-byte little-endian length, that much JSON, then the tensor
bytes) and, once it is checked, exactly the tensor bytes it declares, parsed in memory. The header
and the token ids can be read alone the same way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.storage.backends import WHOLE, Source
from kvstore.storage.blob import (
    METADATA_KEY,
    RECORD_KEY,
    BlobCorruptError,
    BlobError,
    BlobHeader,
    check_metadata,
    parse_record,
    record_text,
)
from kvstore.storage.validate import Expected, Table, declared_bytes

if TYPE_CHECKING:
    import torch

    from kvstore.kv.compressed import CompressedKV

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on its JSON header
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U8": "uint8"}


Reader = Callable[[int, int], bytes]  # bytes [start, end) of the blob


def _layout(read: Reader, where: str) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header (tensor table + metadata) and where the tensor bytes start."""
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise BlobCorruptError(f"blob {where} is not a readable safetensors file: too short")
    (size,) = struct.unpack("<Q", prefix)
    if not 2 <= size <= MAX_HEADER_BYTES:
        raise BlobCorruptError(f"blob {where} is not a readable safetensors file: header length {size}")
    raw = read(8, 8 + size)
    try:
        layout = json.loads(raw)
    except ValueError as exc:
        raise BlobCorruptError(f"blob {where} is not a readable safetensors file: {exc}") from exc
    if not isinstance(layout, dict) or len(raw) != size:
        raise BlobCorruptError(f"blob {where} is not a readable safetensors file: bad header")
    return layout, 8 + size


def _table(layout: dict[str, Any], where: str) -> Table:
    """Each tensor's dtype and shape as the safetensors header declares them (nothing read yet)."""
    table: Table = {}
    for name, entry in layout.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
        except (TypeError, KeyError, ValueError) as exc:
            raise BlobCorruptError(f"blob {where} is not a readable safetensors file: tensor {name!r}") from exc
        table[name] = (_DTYPES.get(dtype, str(dtype)), shape)
    return table


def _ranged(source: Source) -> Reader:
    return lambda start, end: source.read(WHOLE, start, end)


def _header(layout: dict[str, Any], where: str) -> tuple[BlobHeader, dict[str, Any]]:
    metadata = layout.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise BlobCorruptError(f"blob {where} has damaged safetensors metadata")
    check_metadata(metadata, where)
    return BlobHeader.from_json(metadata.get(METADATA_KEY)), parse_record(metadata.get(RECORD_KEY))


@dataclass(frozen=True)
class SafetensorsFormat:
    name: str = "safetensors"
    suffix: str = ".safetensors"

    def encode(
        self, compressed: CompressedKV, header: BlobHeader, record: dict[str, Any]
    ) -> tuple[BlobHeader, dict[str, bytes]]:
        from kvstore.storage.payload import sealed

        header, tensors = sealed(compressed, header)
        return header, self.pack(tensors, header, record)

    def pack(self, tensors: dict[str, torch.Tensor], header: BlobHeader, record: dict[str, Any]) -> dict[str, bytes]:
        """Named tensors and a sealed header -> the blob's one part."""
        from safetensors.torch import save

        metadata = {METADATA_KEY: header.to_json(), RECORD_KEY: record_text(record)}
        return {WHOLE: save(tensors, metadata=metadata)}

    def describe(self, source: Source) -> tuple[BlobHeader, dict[str, Any]]:
        return _header(_layout(_ranged(source), source.location)[0], source.location)

    def token_ids(self, source: Source) -> np.ndarray:
        layout, start = _layout(_ranged(source), source.location)
        entry = layout.get("token_ids")
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            if entry["dtype"] != "I32" or not 0 <= begin <= end or end - begin != 4 * int(np.prod(entry["shape"])):
                raise ValueError(entry)
        except (TypeError, KeyError, ValueError) as exc:
            raise BlobCorruptError(f"blob {source.location} has no readable token_ids tensor") from exc
        data = source.read(WHOLE, start + begin, start + end)
        if len(data) != end - begin:
            raise BlobCorruptError(f"blob {source.location} is truncated")
        return np.frombuffer(data, dtype="<i4")

    def decode(self, source: Source, expected: Expected | None = None) -> tuple[CompressedKV, BlobHeader]:
        """Header, expectations and tensor table checked before a tensor is read (`kvstore.storage.validate`)."""
        from safetensors import safe_open
        from safetensors.torch import load

        from kvstore.storage.payload import decode_checked

        where = source.location
        layout, start = _layout(_ranged(source), where)  # two ranged reads: the header before any tensor byte
        header = _header(layout, where)[0]

        def tensors() -> dict[str, torch.Tensor]:
            try:
                if source.path is None:  # remote: only the bytes the checked header declares are fetched (+1)
                    end = start + declared_bytes(header)
                    data = source.read(WHOLE, 0, end + 1)
                    if len(data) > end:  # as safetensors refuses a local file with bytes nothing indexes
                        raise BlobCorruptError(f"blob {where} is longer than its header declares")
                    return load(data)
                with safe_open(str(source.path), framework="pt", device="cpu") as handle:
                    return {name: handle.get_tensor(name) for name in handle.keys()}  # mmap views, no copy
            except BlobError:
                raise
            except Exception as exc:  # SafetensorError, OSError: a damaged container
                raise BlobCorruptError(f"blob {where} is not a readable safetensors file: {exc}") from exc

        return decode_checked(header, _table(layout, where), tensors, expected, where), header


FORMAT = SafetensorsFormat()
