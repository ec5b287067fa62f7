"""The K/V geometry a model decodes with: what a stored context must match before that model uses it."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOKENS = 1 << 22  # the most context tokens anything here declares or assumes when a model names no window


@dataclass(frozen=True)
class KVShape:
    """Layers, KV heads and head width of a model's cache, the longest context it attends over and its vocabulary.

    A blob is checked against this before any of its tensors is read (`kvstore.storage.validate`):
    a blob of another geometry would fail deep inside attention, or allocate what its header claims.
    `vocab` None: token ids are only checked to be non-negative.
    """

    layers: int
    kv_heads: int
    head_dim: int
    window: int
    vocab: int | None = None
