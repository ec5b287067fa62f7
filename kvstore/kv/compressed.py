"""The compressed KV of one context: per layer, K/V packed head-major with no padding.

This is the unit that presses produce, blobs serialize and caches decode from. Everything is
plain tensors so serializers need no pickling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.kv.shape import KVShape


@dataclass
class CompressedLayer:
    """One layer: kept K/V rows of head 0, then head 1, ... with their original positions.

    When `key_channels` is set (ThinK), every head stores only those key channels: `keys` is
    [kept, channels] while `values` keep all head_dim channels. Pruned channels cost no memory.
    """

    keys: torch.Tensor  # [kept, head_dim], or [kept, channels] when key_channels is set
    values: torch.Tensor  # [kept, head_dim]
    lengths: torch.Tensor  # int32 [kv_heads]: rows per head
    positions: torch.Tensor  # int32 [kept]: token positions in the original context, ascending per head
    key_channels: torch.Tensor | None = None  # int32 [kv_heads, channels]: stored key channels, ascending per head

    @classmethod
    def from_dense(
        cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, key_channels: torch.Tensor | None = None
    ) -> CompressedLayer:
        """Pack [kv_heads, T, D] keys/values under a [kv_heads, T] boolean keep mask.

        `key_channels` ([kv_heads, channels], ascending) keeps only those key channels of each head;
        keeping all of them is the same as passing None.
        """
        if key_channels is not None:
            if key_channels.dim() != 2 or key_channels.shape[0] != keys.shape[0]:
                raise ValueError(f"key_channels must be [kv_heads, channels], got {tuple(key_channels.shape)}")
            if key_channels.shape[1] == keys.shape[-1]:
                key_channels = None  # ascending and complete: nothing is pruned
            else:
                index = key_channels.to(device=keys.device, dtype=torch.long)
                keys = keys.gather(2, index[:, None, :].expand(-1, keys.shape[1], -1))
                key_channels = key_channels.to(device=keys.device, dtype=torch.int32).contiguous()
        head_idx, positions = keep.nonzero(as_tuple=True)  # row-major: head-major, positions ascending
        return cls(
            keys=keys[head_idx, positions].contiguous(),
            values=values[head_idx, positions].contiguous(),
            lengths=keep.sum(dim=1).to(torch.int32),
            positions=positions.to(torch.int32),
            key_channels=key_channels,
        )

    @property
    def kv_heads(self) -> int:
        return int(self.lengths.numel())

    @property
    def head_dim(self) -> int:
        """The model's head dimension (values always keep every channel)."""
        return int(self.values.shape[-1])

    @property
    def kv_elements(self) -> int:
        """Stored K/V scalars: pruned key channels do not count."""
        return self.keys.numel() + self.values.numel()

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.lengths, self.positions)
        if self.key_channels is not None:
            tensors += (self.key_channels,)
        return sum(t.numel() * t.element_size() for t in tensors)


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

    def to_dtype(self, dtype: torch.dtype) -> CompressedKV:
        """The same context with K/V in `dtype` (positions, lengths and channels as they are)."""
        if self.layers[0].values.dtype == dtype:
            return self
        layers = [
            CompressedLayer(
                layer.keys.to(dtype), layer.values.to(dtype), layer.lengths, layer.positions, layer.key_channels
            )
            for layer in self.layers
        ]
        return CompressedKV(layers, self.token_ids, self.prefix_length)

    @property
    def finite(self) -> bool:
        """Whether every stored K/V value is a finite number (a cast to float16 can overflow)."""
        return all(bool(torch.isfinite(t).all()) for layer in self.layers for t in (layer.keys, layer.values))

    @property
    def kv_shape(self) -> KVShape:
        """Its geometry, its own length as the window: what a blob standing for this context must match."""
        return KVShape(len(self.layers), self.kv_heads, self.head_dim, self.original_length)

    @property
    def kept_pairs(self) -> int:
        """Stored (layer, head, token) K/V pairs."""
        return sum(int(layer.lengths.sum()) for layer in self.layers)

    @property
    def total_pairs(self) -> int:
        """K/V pairs a full cache of this context holds."""
        return self.original_length * self.kv_heads * len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    @property
    def kept_elements(self) -> int:
        """Stored K/V scalars: evicted pairs and pruned key channels do not count."""
        return sum(layer.kv_elements for layer in self.layers)

    @property
    def total_elements(self) -> int:
        """K/V scalars a full cache of this context holds (keys and values, every channel)."""
        return 2 * self.total_pairs * self.head_dim

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the full cache's K/V memory not stored (template prefix included in the total).

        Counted in K/V scalars, i.e. bytes at the cache's dtype before any blob quantization, so token
        eviction and key channel pruning (ThinK) both count. Without channel pruning it is exactly the
        fraction of pairs removed, 1 - kept_pairs / total_pairs.
        """
        return 1.0 - self.kept_elements / max(1, self.total_elements)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
