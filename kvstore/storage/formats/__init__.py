"""Blob formats: a CompressedKV (plus its header) to bytes and back. One module per format.

A format knows nothing of paths, fsync or ids: `encode` returns the parts of a blob (one object for
safetensors, a tree of parts for a zarr group, completed by its last part) and `decode` reads a
`Source` that a backend opened. Reading follows one order in every format, the one
`kvstore.storage.validate` describes: the header and the tensor table are checked before any
tensor is read, the checksum and the values before `payload.unpack`. `describe` and `token_ids`
read just the header and the token ids (for gc and reindex), without torch.

Formats are imported on first use, so the index-only commands never load torch or zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from kvstore.storage.blob import BlobError, BlobHeader

if TYPE_CHECKING:
    import numpy as np
    import torch

    from kvstore.kv.compressed import CompressedKV
    from kvstore.storage.backends import Source
    from kvstore.storage.validate import Expected

FORMATS = {"safetensors": ".safetensors", "zarr": ".zarr"}  # name -> suffix of the blob name
_MODULES = {"safetensors": "kvstore.storage.formats.safetensors", "zarr": "kvstore.storage.formats.zarr"}


class BlobFormat(Protocol):
    """One container format. `encode` returns the header with its checksum filled in, and the parts."""

    name: str
    suffix: str

    def encode(
        self, compressed: CompressedKV, header: BlobHeader, record: dict[str, Any]
    ) -> tuple[BlobHeader, dict[str, bytes]]: ...

    def pack(
        self, tensors: dict[str, torch.Tensor], header: BlobHeader, record: dict[str, Any]
    ) -> dict[str, bytes]: ...

    def decode(self, source: Source, expected: Expected | None = None) -> tuple[CompressedKV, BlobHeader]: ...

    def describe(self, source: Source) -> tuple[BlobHeader, dict[str, Any]]: ...  # header, record info

    def token_ids(self, source: Source) -> np.ndarray: ...


def get_format(name: str) -> BlobFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown blob format {name!r}: choose one of {', '.join(FORMATS)}")
    return importlib.import_module(_MODULES[name]).FORMAT


def format_of(blob_name: str) -> str:
    """The format a blob name's suffix says (.safetensors / .zarr)."""
    for name, suffix in FORMATS.items():
        if blob_name.endswith(suffix):
            return name
    raise BlobError(f"{blob_name} is not a kvstore blob (expected a .safetensors file or a .zarr group)")
