"""Attention of every KV head's queries to its own packed prefix rows, with log-sum-exp: the backends.

Input: queries [Hkv, R, Dk] (R rows per KV head: batch x group x new tokens) and a `RaggedPrefix`
(packed rows, cumulative per-head lengths). Output: [Hkv, R, Dv] and the log-sum-exp [Hkv, R] in
float32, -inf for a head that kept nothing. Which backend runs is chosen by device and dtype:

* "varlen": torch's varlen flash attention, the whole layer in one call, each KV head one
  sequence of the packed layout (CUDA, float16 / bfloat16, equal key and value widths);
* "flex": FlexAttention over the heads flattened into one sequence, a block mask keeping each query
  row to its head's rows (CUDA otherwise, e.g. float32 or ThinK's narrower keys; compiled there);
* "heads": one fused attention op per head over views of the packed rows (CPU and other devices:
  measured faster than any single-call form on CPU, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from functools import cache

import torch

from kvstore.decode.prefix import RaggedPrefix
from kvstore.engine.lse import attention_with_lse

PrefixOp = Callable[[torch.Tensor, RaggedPrefix, float], tuple[torch.Tensor, torch.Tensor]]
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_available() -> bool:
    """Whether this torch build ships varlen attention (torch.nn.attention.varlen, torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_prefix_op(
    device: torch.device, dtype: torch.dtype, key_dim: int, value_dim: int, has_varlen: bool | None = None
) -> str:
    """The backend for a prefix on `device` in `dtype` (see the module docstring for why)."""
    if device.type != "cuda":
        return "heads"
    has_varlen = varlen_available() if has_varlen is None else has_varlen
    flash_shape = key_dim == value_dim and key_dim % 8 == 0 and key_dim <= 256
    if has_varlen and dtype in FLASH_DTYPES and flash_shape:
        return "varlen"
    return "flex"


def _heads(query: torch.Tensor, prefix: RaggedPrefix, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, width = query.shape[1], prefix.values.shape[-1]
    outputs, lses = [], []
    for h, (keys, values) in enumerate(zip(prefix.head_keys, prefix.head_values, strict=True)):
        if keys.shape[0] == 0:  # nothing kept: weight zero in the merge (fused ops do not take empty keys)
            outputs.append(query.new_zeros(1, 1, rows, width))
            lses.append(torch.full((1, 1, rows), float("-inf"), device=query.device))
            continue
        out, head_lse = attention_with_lse(query[h][None, None], keys[None, None], values[None, None], scaling)
        outputs.append(out)
        lses.append(head_lse)
    return torch.cat(outputs).reshape(-1, rows, width), torch.cat(lses).reshape(-1, rows)


def _varlen(query: torch.Tensor, prefix: RaggedPrefix, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.attention.flex_attention import AuxRequest
    from torch.nn.attention.varlen import varlen_attn

    kv_heads, rows, dim = query.shape
    cu_rows = torch.arange(0, (kv_heads + 1) * rows, rows, device=query.device, dtype=torch.int32)
    output, lse = varlen_attn(
        query.reshape(kv_heads * rows, 1, dim),
        prefix.keys[:, None],
        prefix.values[:, None],
        cu_rows,
        prefix.cu_lengths,
        rows,
        max(prefix.lengths, default=0),
        return_aux=AuxRequest(lse=True),
        scale=scaling,
    )
    return output.reshape(kv_heads, rows, -1), lse.float().reshape(kv_heads, rows)


# Block masks depend only on the prefix and the number of query rows: built once per (prefix, rows).
_block_masks: weakref.WeakKeyDictionary[RaggedPrefix, dict[int, object]] = weakref.WeakKeyDictionary()


def _block_mask(prefix: RaggedPrefix, rows: int) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    masks = _block_masks.setdefault(prefix, {})
    if rows not in masks:
        device = prefix.keys.device
        lengths = torch.tensor(prefix.lengths, device=device)
        row_head = torch.repeat_interleave(torch.arange(prefix.kv_heads, device=device), lengths)

        def same_head(batch, head, q_idx, kv_idx):  # noqa: ANN001, ANN202 (FlexAttention's mask_mod)
            return q_idx // rows == row_head[kv_idx]

        total = prefix.kv_heads * rows
        masks[rows] = create_block_mask(same_head, 1, 1, total, prefix.keys.shape[0], device=device)
    return masks[rows]


@cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(query: torch.Tensor, prefix: RaggedPrefix, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    kv_heads, rows, dim = query.shape
    if prefix.keys.shape[0] == 0:  # every head empty: nothing to attend to
        return query.new_zeros(kv_heads, rows, prefix.values.shape[-1]), query.new_full(
            (kv_heads, rows), float("-inf"), dtype=torch.float32
        )
    attend = _compiled_flex() if query.device.type == "cuda" else flex_attention
    with warnings.catch_warnings():  # off CUDA this is the unfused reference form (tests), which it warns about
        warnings.simplefilter("ignore", UserWarning)
        output, aux = attend(
            query.reshape(1, 1, kv_heads * rows, dim),
            prefix.keys[None, None],
            prefix.values[None, None],
            block_mask=_block_mask(prefix, rows),
            scale=scaling,
            return_aux=AuxRequest(lse=True),
        )
    return output.reshape(kv_heads, rows, -1), aux.lse.float().reshape(kv_heads, rows)


PREFIX_OPS: dict[str, PrefixOp] = {"heads": _heads, "varlen": _varlen, "flex": _flex}
