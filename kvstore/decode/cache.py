"""`CompressedCache`: a transformers Cache over a compressed, per-head ragged prefix.

Each layer keeps its prefix packed exactly as stored (no padding: memory in use is what was kept)
and appends question/answer tokens after it, into preallocated space that grows by doubling (no
copy of the whole suffix per generated token). New tokens take positions from the ORIGINAL
context length. `reset()` drops the appended tokens in O(1), so every question starts from the
same compressed prefix and no prefill is repeated; `fork()` gives another batch its own suffix
over the same prefix tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvstore.decode.kernels import DEFAULT_KERNEL, Kernel, get_kernel
from kvstore.decode.prefix import RaggedPrefix
from kvstore.engine.attention import clear_pending, hand_over_prefix
from kvstore.kv.compressed import CompressedKV

if TYPE_CHECKING:
    from kvstore.engine.models import LoadedModel
    from kvstore.storage.store import ContextStore

# Suffix rows allocated at least, when nothing was reserved: a question plus a short answer.
_MIN_SUFFIX_CAPACITY = 64


class RaggedLayer(CacheLayerMixin):
    """One layer: a fixed ragged prefix plus a growing dense suffix of shape [B, Hkv, S, D].

    `keys` / `values` are views of the first S rows of the suffix buffers (what attention sees).
    """

    is_sliding = False

    def __init__(self, prefix: RaggedPrefix, original_length: int, kernel: Kernel):
        super().__init__()
        self.prefix = prefix
        self.original_length = original_length
        self.kernel = kernel
        self.is_initialized = True
        self.reserved = 0  # suffix rows to allocate at the first update (0: a small default, doubled as needed)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the prefix exists from construction, the suffix buffers at the first update."""

    def _room_for(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffix buffers that hold the current rows plus these, reallocated (doubling) only when full."""
        length, new = self.suffix_length, key_states.shape[-2]
        if self._buffers is not None and length + new <= self._buffers[0].shape[-2]:
            return self._buffers
        held = 0 if self._buffers is None else self._buffers[0].shape[-2]
        capacity = max(length + new, 2 * held, self.reserved, _MIN_SUFFIX_CAPACITY)
        buffers = tuple(
            states.new_empty(*states.shape[:-2], capacity, states.shape[-1]) for states in (key_states, value_states)
        )
        if length:
            buffers[0][..., :length, :].copy_(self.keys)
            buffers[1][..., :length, :].copy_(self.values)
        self._buffers = buffers
        return buffers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length, new = self.suffix_length, key_states.shape[-2]
        key_buffer, value_buffer = self._room_for(key_states, value_states)
        key_buffer[..., length : length + new, :].copy_(key_states)
        value_buffer[..., length : length + new, :].copy_(value_states)
        self.keys, self.values = key_buffer[..., : length + new, :], value_buffer[..., : length + new, :]
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
        """Forget the appended tokens and free their buffers (memory back to what was kept)."""
        self.keys = self.values = None
        self._buffers = None
        self.reserved = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._buffers is not None:
            index = beam_idx.to(self._buffers[0].device)
            self._buffers = tuple(buffer.index_select(0, index) for buffer in self._buffers)
            self.keys, self.values = (buffer[..., : self.suffix_length, :] for buffer in self._buffers)

    def fork(self) -> RaggedLayer:
        """The same prefix tensors (not copied) with an empty suffix of its own."""
        return RaggedLayer(self.prefix, self.original_length, self.kernel)

    @property
    def nbytes(self) -> int:
        suffix = 0 if self._buffers is None else sum(b.numel() * b.element_size() for b in self._buffers)
        return self.prefix.nbytes + suffix


class CompressedCache(Cache):
    """Decode many questions against one compressed context; pass it as `cache=` to the model or `generate`.

    `kernel` names the decode kernel ("auto": per call, the one measured faster for that shape on
    that device; see `kvstore.decode.kernels`).
    """

    def __init__(
        self,
        compressed: CompressedKV,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        kernel: str = DEFAULT_KERNEL,
        layers: list[RaggedLayer] | None = None,
    ):
        if layers is None:
            attend = get_kernel(kernel)
            layers = [
                RaggedLayer(RaggedPrefix.from_layer(layer, dtype, device), compressed.original_length, attend)
                for layer in compressed.layers
            ]
        super().__init__(layers=layers)
        self.compressed = compressed
        self.kernel = kernel

    @classmethod
    def for_model(cls, compressed: CompressedKV, loaded: LoadedModel, kernel: str = DEFAULT_KERNEL) -> CompressedCache:
        """A cache `loaded` decodes from: on its device, in its dtype, whatever dtype the context was stored in."""
        return cls(compressed, dtype=loaded.model.dtype, device=loaded.device, kernel=kernel)

    @classmethod
    def from_store(
        cls, store: ContextStore, context_id: str, loaded: LoadedModel, kernel: str = DEFAULT_KERNEL
    ) -> CompressedCache:
        """A stored context, validated against `loaded` (fingerprint, geometry) and ready for it to decode."""
        return cls.for_model(store.load(context_id, loaded.fingerprint, loaded.kv_shape), loaded, kernel)

    @property
    def original_length(self) -> int:
        return self.compressed.original_length

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache right now (the per-head prefix plus any appended tokens' buffers)."""
        return sum(layer.nbytes for layer in self.layers)

    def reserve(self, tokens: int) -> None:
        """Allocate room for `tokens` appended rows at the next update (the question plus its answer)."""
        for layer in self.layers:
            layer.reserved = max(layer.reserved, tokens)

    def fork(self) -> CompressedCache:
        """Another cache over the same prefix tensors (no copy) with its own, empty suffix.

        Several question batches can then decode over one loaded context at the same time, each in
        its own fork (one forward pass at a time per thread, as the attention hand-over requires).
        """
        return CompressedCache(self.compressed, kernel=self.kernel, layers=[layer.fork() for layer in self.layers])

    def reset(self) -> None:
        """Back to the compressed prefix: forget every appended token."""
        clear_pending()
        super().reset()
