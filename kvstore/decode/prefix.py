"""The decode-time view of one layer's compressed prefix: packed K/V rows, per-head lengths, no padding.

Built from a stored `CompressedLayer` (the data type knows no kernel); decode kernels read it,
either head by head (`head_keys`, views of the packed rows) or whole, through the cumulative
per-head lengths (`cu_lengths`) that varlen attention kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvstore.kv.compressed import CompressedLayer


@dataclass(eq=False)  # compared and hashed by identity: kernels cache per-prefix state by it
class RaggedPrefix:
    """One layer's compressed prefix: each KV head keeps its own number of rows, with no padding.

    With `key_channels` (ThinK), every head stores only those key channels: its prefix scores use
    the query projected onto them, which equals zeroing the pruned channels of query and prefix keys.
    """

    keys: torch.Tensor  # packed head-major [kept, head_dim], or [kept, channels] when key channels are pruned
    values: torch.Tensor  # packed head-major [kept, head_dim]
    lengths: tuple[int, ...]  # rows per KV head
    key_channels: torch.Tensor | None = None  # int64 [kv_heads, channels] ascending per head, or None (all)
    cu_lengths: torch.Tensor = field(init=False)  # int32 [kv_heads + 1]: where each head's rows start
    head_keys: list[torch.Tensor] = field(init=False)  # per head: a view of its packed key rows
    head_values: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = tuple(int(n) for n in self.lengths)
        if sum(self.lengths) != self.keys.shape[0] or self.keys.shape[0] != self.values.shape[0]:
            raise ValueError(f"per-head lengths {self.lengths} do not add up to the packed rows {self.keys.shape[0]}")
        starts = torch.tensor((0, *self.lengths), dtype=torch.int64).cumsum(0)
        self.cu_lengths = starts.to(device=self.keys.device, dtype=torch.int32)
        self.head_keys = list(self.keys.split(self.lengths))
        self.head_values = list(self.values.split(self.lengths))

    @classmethod
    def from_layer(
        cls, layer: CompressedLayer, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> RaggedPrefix:
        """The packed layer as it is (no copy when no cast or move is needed)."""
        keys = layer.keys.to(device=device, dtype=dtype or layer.keys.dtype)
        values = layer.values.to(device=device, dtype=dtype or layer.values.dtype)
        channels = None
        if layer.key_channels is not None:
            channels = layer.key_channels.to(device=keys.device, dtype=torch.long)
        return cls(keys, values, tuple(layer.lengths.tolist()), channels)

    @classmethod
    def from_heads(
        cls, keys: list[torch.Tensor], values: list[torch.Tensor], key_channels: list[torch.Tensor] | None = None
    ) -> RaggedPrefix:
        """Pack per-head tensors (tests and benchmarks build prefixes this way)."""
        channels = None if key_channels is None else torch.stack(key_channels).long()
        return cls(torch.cat(keys), torch.cat(values), tuple(k.shape[0] for k in keys), channels)

    @property
    def kv_heads(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, *(() if self.key_channels is None else (self.key_channels,)))
        return sum(t.numel() * t.element_size() for t in tensors)
