"""The compressed KV of one context: per layer, K/V packed head-major with no padding.

This is the unit that presses produce, blobs serialize and caches decode from. Everything is
plain tensors so serializers need no pickling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.attention import RaggedPrefix


@dataclass
class CompressedLayer:
    """One layer: kept K/V rows of head 0, then head 1, ... with their original positions."""

    keys: torch.Tensor  # [kept, head_dim]
    values: torch.Tensor  # [kept, head_dim]
    lengths: torch.Tensor  # int32 [kv_heads]: rows per head
    positions: torch.Tensor  # int32 [kept]: token positions in the original context, ascending per head

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> CompressedLayer:
        """Pack [kv_heads, T, D] keys/values under a [kv_heads, T] boolean keep mask."""
        head_idx, positions = keep.nonzero(as_tuple=True)  # row-major: head-major, positions ascending
        return cls(
            keys=keys[head_idx, positions].contiguous(),
            values=values[head_idx, positions].contiguous(),
            lengths=keep.sum(dim=1).to(torch.int32),
            positions=positions.to(torch.int32),
        )

    @property
    def kv_heads(self) -> int:
        return int(self.lengths.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.lengths, self.positions))

    def per_head(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> RaggedPrefix:
        """Split into one tensor per head (views of the packed rows when no cast or move is needed)."""
        sizes = self.lengths.tolist()
        keys = self.keys.to(device=device, dtype=dtype or self.keys.dtype)
        values = self.values.to(device=device, dtype=dtype or self.values.dtype)
        return RaggedPrefix(list(keys.split(sizes)), list(values.split(sizes)))


@dataclass
class CompressedKV:
    """A compressed context: its layers, the context token ids and where the document starts."""

    layers: list[CompressedLayer]
    token_ids: torch.Tensor  # int32 [original_length]: template prefix + document
    prefix_length: int  # leading template tokens, never evicted

    @property
    def original_length(self) -> int:
        return int(self.token_ids.numel())

    @property
    def kv_heads(self) -> int:
        return self.layers[0].kv_heads

    @property
    def kept_pairs(self) -> int:
        """Stored (layer, head, token) K/V pairs."""
        return sum(int(layer.lengths.sum()) for layer in self.layers)

    @property
    def total_pairs(self) -> int:
        """K/V pairs a full cache of this context holds."""
        return self.original_length * self.kv_heads * len(self.layers)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of all context K/V pairs removed (template prefix included in the total)."""
        return 1.0 - self.kept_pairs / max(1, self.total_pairs)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
