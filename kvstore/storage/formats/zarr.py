"""zarr v3 blobs: one group per context, one subgroup per layer, each array one zstd-compressed chunk.

Encoding writes the group into an in-memory zarr store and hands its parts to the backend, the
root ``zarr.json`` (whose attributes carry the header) last: a group whose put stopped halfway has
no root and is no blob. A local group is read in place (zarr's LocalStore: one layer's arrays can
be read alone); a remote one is fetched part by part into memory first. zarr is an optional extra,
imported on first use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.errors import import_extra
from kvstore.storage.backends import TREE_ROOT, Source
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
from kvstore.storage.validate import declared_bytes, declared_tensors

if TYPE_CHECKING:
    import torch

    from kvstore.kv.compressed import CompressedKV
    from kvstore.storage.validate import Expected

ROOT = TREE_ROOT  # the group's root metadata; the backend writes it last


def _zarr_path(name: str) -> str:
    """'layer.3.keys.q' -> 'layer.3/keys.q': one zarr subgroup per layer, so a layer reads alone."""
    if name.startswith("layer."):
        _, index, rest = name.split(".", 2)
        return f"layer.{index}/{rest}"
    return name


def _zarr() -> Any:
    return import_extra("zarr", "zarr")


MAX_ROOT_BYTES = 16 * 2**20  # the group's root metadata (header and record info): far below this


def _fetch_limit(header: BlobHeader) -> int:
    """The most bytes a remote group with this (checked) header may hold: its tensors' raw bytes plus
    zstd's worst-case growth and each array's own metadata."""
    return declared_bytes(header) * 101 // 100 + 16 * 1024 * (len(declared_tensors(header)) + header.layers + 2)


def _store(source: Source, header: BlobHeader) -> Any:
    """A read-only zarr store over the blob: in place when local, else its parts fetched into memory,
    refused unread when they add up to more than the header allows."""
    zarr = _zarr()
    if source.path is not None:
        return zarr.storage.LocalStore(str(source.path), read_only=True)
    from zarr.core.buffer import cpu

    parts = {name: cpu.Buffer.from_bytes(data) for name, data in source.read_parts(_fetch_limit(header)).items()}
    return zarr.storage.MemoryStore(parts, read_only=True)


@dataclass(frozen=True)
class ZarrFormat:
    name: str = "zarr"
    suffix: str = ".zarr"
    level: int = 3

    def encode(
        self, compressed: CompressedKV, header: BlobHeader, record: dict[str, Any]
    ) -> tuple[BlobHeader, dict[str, bytes]]:
        from kvstore.storage.payload import sealed

        header, tensors = sealed(compressed, header)
        return header, self.pack(tensors, header, record)

    def pack(self, tensors: dict[str, torch.Tensor], header: BlobHeader, record: dict[str, Any]) -> dict[str, bytes]:
        """Named tensors and a sealed header -> the group's parts, its root metadata last."""
        import torch

        from kvstore.storage.blob import dtype_name

        zarr = _zarr()
        parts: dict[str, Any] = {}
        group = zarr.open_group(store=zarr.storage.MemoryStore(parts), mode="w-", zarr_format=3)
        group.attrs.update({METADATA_KEY: json.loads(header.to_json()), RECORD_KEY: record_text(record)})
        for name, tensor in tensors.items():
            stored = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            data = stored.numpy()
            array = group.create_array(
                _zarr_path(name),
                shape=data.shape,
                dtype=data.dtype,
                chunks=tuple(max(1, n) for n in data.shape),
                compressors=zarr.codecs.ZstdCodec(level=self.level, checksum=True),
                attributes={"torch_dtype": dtype_name(tensor.dtype)},
            )
            array[...] = data
        ordered = {name: buffer.to_bytes() for name, buffer in parts.items() if name != ROOT}
        ordered[ROOT] = parts[ROOT].to_bytes()  # last: it completes the blob
        return ordered

    def _root(self, source: Source) -> dict[str, Any]:
        try:
            raw = source.read(ROOT, 0, MAX_ROOT_BYTES + 1)
            if len(raw) > MAX_ROOT_BYTES:
                raise BlobCorruptError(f"blob {source.location} has a root metadata object over {MAX_ROOT_BYTES} bytes")
            attributes = json.loads(raw).get("attributes")
        except BlobError:
            raise
        except Exception as exc:
            raise BlobCorruptError(f"blob {source.location} is not a readable zarr group: {exc}") from exc
        if not isinstance(attributes, dict):
            raise BlobCorruptError(f"blob {source.location} is not a readable zarr group: no attributes")
        check_metadata(attributes, source.location)
        return attributes

    def describe(self, source: Source) -> tuple[BlobHeader, dict[str, Any]]:
        attributes = self._root(source)
        return BlobHeader.from_dict(attributes.get(METADATA_KEY)), parse_record(attributes.get(RECORD_KEY))

    def _group(self, source: Source, header: BlobHeader) -> Any:
        try:
            return _zarr().open_group(store=_store(source, header), mode="r", zarr_format=3)
        except BlobError:
            raise
        except Exception as exc:
            raise BlobCorruptError(f"blob {source.location} is not a readable zarr group: {exc}") from exc

    def token_ids(self, source: Source) -> np.ndarray:
        try:
            ids = np.asarray(self._group(source, self.describe(source)[0])["token_ids"][...])
        except BlobError:
            raise
        except Exception as exc:
            raise BlobCorruptError(f"blob {source.location} has no readable token_ids array: {exc}") from exc
        if ids.dtype != np.int32 or ids.ndim != 1:
            raise BlobCorruptError(f"blob {source.location} has token_ids of type {ids.dtype}{list(ids.shape)}")
        return ids

    def decode(self, source: Source, expected: Expected | None = None) -> tuple[CompressedKV, BlobHeader]:
        """Header, expectations and array metadata checked before an array is read (`kvstore.storage.validate`)."""
        import torch

        from kvstore.storage.payload import decode_checked

        where = source.location
        header = self.describe(source)[0]  # the root alone first: it bounds what the group may hold
        group = self._group(source, header)
        attributes = dict(group.attrs)
        check_metadata(attributes, where)
        if BlobHeader.from_dict(attributes.get(METADATA_KEY)) != header:
            raise BlobCorruptError(f"blob {where} changed while it was read")
        arrays = _arrays(group, where)

        def tensors() -> dict[str, torch.Tensor]:
            read = {}
            for name, array in arrays.items():
                try:
                    tensor = torch.from_numpy(np.asarray(array[...]))
                except Exception as exc:  # zstd checksum failure, truncated or missing chunk
                    raise BlobCorruptError(f"blob {where}: array {name!r} is unreadable: {exc}") from exc
                read[name] = tensor.view(torch.bfloat16) if _dtype(array) == "bfloat16" else tensor
            return read

        table = {name: (_dtype(array), tuple(array.shape)) for name, array in arrays.items()}
        return decode_checked(header, table, tensors, expected, where), header


def _dtype(array: Any) -> str:
    """An array's element type; bfloat16 is stored as int16 bits and says so in an attribute."""
    stored = str(array.dtype)
    return "bfloat16" if stored == "int16" and array.attrs.get("torch_dtype") == "bfloat16" else stored


def _arrays(group: Any, where: str) -> dict[str, Any]:
    """Every array of the group by tensor name ('layer.3/keys.q' -> 'layer.3.keys.q'), metadata only."""
    try:
        members = list(group.members(max_depth=None))
    except Exception as exc:
        raise BlobCorruptError(f"blob {where} is not a readable zarr group: {exc}") from exc
    zarr = _zarr()
    return {path.replace("/", ".", 1): item for path, item in members if isinstance(item, zarr.Array)}


FORMAT = ZarrFormat()
