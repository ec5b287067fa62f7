"""Synthetic compressed contexts for blob and store tests: no model needed."""

from __future__ import annotations

from pathlib import Path

import torch

from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.kv.quant import QuantizedTensor, _expand
from kvstore.kv.shape import KVShape
from kvstore.storage.backends.local import LocalBackend
from kvstore.storage.blob import BlobHeader
from kvstore.storage.formats import format_of, get_format
from kvstore.storage.validate import Expected

PRESS = {"press": "kvzip", "compression_ratio": 0.75, "budget": "global", "chunk_size": 2000}


def random_compressed(
    layers: int = 3, kv_heads: int = 3, head_dim: int = 16, length: int = 80, dtype=torch.float32, seed: int = 0
) -> CompressedKV:
    """A synthetic compressed context with random per-head lengths (the template prefix always kept)."""
    generator = torch.Generator().manual_seed(seed)
    packed = []
    for _ in range(layers):
        keep = torch.rand(kv_heads, length, generator=generator) < torch.rand(kv_heads, 1, generator=generator)
        keep[:, :4] = True
        keys = torch.randn(kv_heads, length, head_dim, generator=generator) * 2
        values = torch.randn(kv_heads, length, head_dim, generator=generator)
        packed.append(CompressedLayer.from_dense(keys.to(dtype), values.to(dtype), keep))
    token_ids = torch.randint(0, 1000, (length,), generator=generator, dtype=torch.int32)
    return CompressedKV(packed, token_ids, prefix_length=4)


def half_step(q: QuantizedTensor) -> torch.Tensor:
    """The per-element error bound of `q`: half of its group's step, shaped like the tensor."""
    return _expand(q.scales, q.axis, q.shape, q.lengths, q.group_size) / 2


def save_blob(path: Path, compressed: CompressedKV, header: BlobHeader, record: dict | None = None) -> BlobHeader:
    """Encode a blob in the format its suffix names and publish it at `path` (a local backend rooted at its folder)."""
    fmt = get_format(format_of(path.name))
    written, parts = fmt.encode(compressed, header, record or {})
    LocalBackend(path.parent).put(path.name, parts)
    return written


def load_blob(
    path: Path, model_fingerprint: str | None = None, shape: KVShape | None = None
) -> tuple[CompressedKV, BlobHeader]:
    """Decode the blob at `path` as the store would (a local file: memory-mapped safetensors)."""
    source = LocalBackend(path.parent).open(path.name)
    return get_format(format_of(path.name)).decode(source, Expected(model_fingerprint, shape))


def describe_blob(path: Path) -> BlobHeader:
    return get_format(format_of(path.name)).describe(LocalBackend(path.parent).open(path.name))[0]
