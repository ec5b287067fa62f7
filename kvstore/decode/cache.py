"""`CompressedCache`: a transformers Cache over a compressed, per-head ragged prefix.

Each layer keeps one tensor per KV head, exactly as long as that head's kept tokens (no padding:
memory in use is what was stored), and appends question/answer tokens after it. New tokens take
positions from the ORIGINAL context length. `reset()` drops the appended tokens in O(1), so every
question starts from the same compressed prefix and no prefill is repeated.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvstore.decode.kernels import DEFAULT_KERNEL, Kernel, get_kernel
from kvstore.decode.prefix import RaggedPrefix
from kvstore.engine.attention import clear_pending, hand_over_prefix
from kvstore.kv.compressed import CompressedKV


class RaggedLayer(CacheLayerMixin):
    """One layer: a fixed ragged prefix plus a growing dense suffix of shape [B, Hkv, S, D]."""

    is_sliding = False

    def __init__(self, prefix: RaggedPrefix, original_length: int, kernel: Kernel):
        super().__init__()
        self.prefix = prefix
        self.original_length = original_length
        self.kernel = kernel
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the prefix exists from construction, the suffix grows by update."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        hand_over_prefix(self.keys, self)
        return self.keys, self.values

    def attend(
        self,
        query: torch.Tensor,
        suffix_keys: torch.Tensor,
        suffix_values: torch.Tensor,
        suffix_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """The attention call this layer's `update` handed over: prefix + suffix through the kernel."""
        return self.kernel(query, self.prefix, suffix_keys, suffix_values, suffix_mask, scaling)

    @property
    def suffix_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.original_length + self.suffix_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers builds the mask over the appended tokens only; the prefix mask is per head.
        return self.suffix_length + query_length, self.original_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    @property
    def nbytes(self) -> int:
        suffix = 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()
        return self.prefix.nbytes + suffix


class CompressedCache(Cache):
    """Decode many questions against one compressed context; pass it as `cache=` to the model or `generate`."""

    def __init__(
        self,
        compressed: CompressedKV,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        kernel: str = DEFAULT_KERNEL,
    ):
        attend = get_kernel(kernel)
        layers = [
            RaggedLayer(RaggedPrefix.from_layer(layer, dtype, device), compressed.original_length, attend)
            for layer in compressed.layers
        ]
        super().__init__(layers=layers)
        self.compressed = compressed

    @property
    def original_length(self) -> int:
        return self.compressed.original_length

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache right now (the per-head prefix plus any appended tokens)."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        """Back to the compressed prefix: forget every appended token."""
        clear_pending()
        super().reset()
