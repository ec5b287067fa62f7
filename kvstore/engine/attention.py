"""kvstore's attention function, registered with transformers' AttentionInterface.

It does two jobs that model code cannot do by itself, without patching any model:

* ragged decoding: a cache layer whose prefix transformers cannot attend to (a compressed,
  per-head ragged one) hands over a `PrefixAttention` for the keys it returns, and this function
  lets it attend the query to that prefix and the newly appended tokens (the kernels live in
  `kvstore.decode.kernels`; this module knows none of them);
* observation: a scoring press may watch the post-RoPE queries and keys of every layer during a
  forward pass (KVzip's reconstruction pass, H2O's prefill) without a second implementation.

Everything else falls through to transformers' SDPA attention, so a model set to this
implementation behaves exactly like the stock one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstore.errors import InputError

ATTENTION_NAME = "kvstore"


class AttentionObserver(Protocol):
    """Sees each layer's post-RoPE queries, keys and values during an observed forward pass.

    It may return the attention output ([B, q, Hq, D], causal over the keys' last q positions) when
    it computes it anyway, so the same logits are not built twice; None lets SDPA compute it.
    """

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor | None: ...


class PrefixAttention(Protocol):
    """Attends a layer's query to a prefix the cache holds outside transformers' view, plus the suffix.

    query [B, Hq, q, D]; suffix keys/values [B, Hkv, S, D] (what the cache layer returned); mask
    over the suffix as transformers built it (or None). Returns [B, q, Hq, D].
    """

    def attend(
        self,
        query: torch.Tensor,
        suffix_keys: torch.Tensor,
        suffix_values: torch.Tensor,
        suffix_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor: ...

    def get_seq_length(self) -> int: ...


class UnsupportedAttentionError(InputError):
    """The model asks for an attention variant the ragged decode path cannot honour (named in the message)."""


def check_ragged_kwargs(kwargs: dict[str, object], seq_length: int) -> None:
    """Refuse what the ragged path would otherwise silently drop: logit softcapping, attention sinks,
    and a sliding window that would cut keys off (a window at least as long as the sequence changes nothing)."""
    if kwargs.get("softcap") is not None:
        raise UnsupportedAttentionError(
            f"this model caps attention logits (softcap={kwargs['softcap']}), which compressed decoding does not "
            "support (supported families: README, 'Supported models')"
        )
    if kwargs.get("s_aux") is not None:
        raise UnsupportedAttentionError("this model uses attention sinks, which compressed decoding does not support")
    window = kwargs.get("sliding_window")
    if window is not None and seq_length > int(window):
        raise UnsupportedAttentionError(
            f"this layer attends through a sliding window of {window} tokens, shorter than the {seq_length:,} "
            "tokens of context and question: compressed decoding attends to every kept token and cannot honour it"
        )


_local = threading.local()


@contextmanager
def observing(observer: AttentionObserver) -> Iterator[AttentionObserver]:
    """Let `observer` see every attention call made by this thread inside the block."""
    previous = getattr(_local, "observer", None)
    _local.observer = observer
    try:
        yield observer
    finally:
        _local.observer = previous


def hand_over_prefix(suffix_keys: torch.Tensor, prefix: PrefixAttention) -> None:
    """Called by a ragged cache layer's `update`: the next attention call on these keys goes to `prefix`.

    The handshake is checked by identity of the returned key tensor, so a model that does not route
    attention through this function fails loudly instead of silently ignoring the prefix.
    """
    pending = getattr(_local, "pending", None)
    if pending is not None:
        raise RuntimeError(
            "a CompressedCache needs attn_implementation='kvstore': "
            "load models with kvstore.engine.models.load_model or call model.set_attn_implementation('kvstore')"
        )
    _local.pending = (suffix_keys, prefix)


def clear_pending() -> None:
    """Forget a hand-over left behind by a forward pass that raised midway."""
    _local.pending = None


def _take_prefix(key: torch.Tensor) -> PrefixAttention | None:
    pending = getattr(_local, "pending", None)
    if pending is None or pending[0] is not key:
        return None
    _local.pending = None
    return pending[1]


def kvstore_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The registered attention implementation (see module docstring)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    observer = getattr(_local, "observer", None)
    if observer is not None:
        output = observer.observe(module.layer_idx, query, key, value, scale)
        if output is not None:
            return output, None
    prefix = _take_prefix(key)
    if prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    check_ragged_kwargs(kwargs, prefix.get_seq_length())
    return prefix.attend(query, key, value, attention_mask, scale), None


AttentionInterface.register(ATTENTION_NAME, kvstore_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
