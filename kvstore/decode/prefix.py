"""The decode-time view of one layer's compressed prefix: one tensor per KV head, no padding.

Built from a stored `CompressedLayer` (the data type knows no kernel); decode kernels read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.kv.compressed import CompressedLayer


@dataclass
class RaggedPrefix:
    """One layer's compressed prefix: each KV head keeps its own number of rows, with no padding.

    With `key_channels` (ThinK), head h stores only those key channels: its prefix scores use the
    query projected onto them, which equals zeroing the pruned channels of query and prefix keys.
    """

    keys: list[torch.Tensor]  # per kv head: [kept_h, head_dim], or [kept_h, channels] when key channels are pruned
    values: list[torch.Tensor]  # per kv head: [kept_h, head_dim]
    key_channels: list[torch.Tensor] | None = None  # per kv head: int64 [channels] ascending, or None (all)

    @classmethod
    def from_layer(
        cls, layer: CompressedLayer, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> RaggedPrefix:
        """Split a packed layer per head (views of the packed rows when no cast or move is needed)."""
        sizes = layer.lengths.tolist()
        keys = layer.keys.to(device=device, dtype=dtype or layer.keys.dtype)
        values = layer.values.to(device=device, dtype=dtype or layer.values.dtype)
        channels = None
        if layer.key_channels is not None:
            channels = list(layer.key_channels.to(device=keys.device, dtype=torch.long).unbind(0))
        return cls(list(keys.split(sizes)), list(values.split(sizes)), channels)

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, *(self.key_channels or ()))
        return sum(t.numel() * t.element_size() for t in tensors)
