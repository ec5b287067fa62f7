"""Decode kernels: attend a batch of queries to a layer's ragged compressed prefix plus the suffix.

A kernel is a function `(query, prefix, suffix_keys, suffix_values, attention_mask, scaling) -> output`
(shapes in `kvstore.decode.kernels.loop.ragged_attention`), chosen by name: "loop" (the reference,
one small attention per KV head), "fused" (the layer's prefix in one varlen call on CUDA, plus
one call for the suffix), "masked" (the whole packed prefix in one matmul, other heads' rows
masked) or "auto", which picks one of them per call by what measured faster (`choose_kernel`).
Adding one is one new module plus one line here (and its name in `kvstore.config.DECODE_KERNELS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstore.decode.kernels.fused import fused_attention
from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.kernels.masked import masked_attention
from kvstore.decode.prefix import RaggedPrefix
from kvstore.errors import InputError

Kernel = Callable[[torch.Tensor, RaggedPrefix, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]

KERNELS: dict[str, Kernel] = {"loop": ragged_attention, "fused": fused_attention, "masked": masked_attention}
AUTO = "auto"
DEFAULT_KERNEL = AUTO
# On CPU the fused kernel's per-head op runs a head's few query rows on one core, where the loop's
# matmuls use every core: with fewer rows per KV head than this (one question decoding) the loop
# measured faster on CPU, with more (batches, the question's own step) the fused kernel
# (docs/BENCHMARKS.md, decode kernels).
CPU_FUSED_MIN_ROWS = 8
# Below CPU_FUSED_MIN_ROWS, a layer whose kv_heads x kept rows (the masked kernel's score columns per
# query row) stay within this decodes faster through the masked kernel (a few ops per layer) than
# through the loop (several ops per head): measured on SmolLM2's 3 KV heads at 4K tokens (9K) and not
# at 16K (36K), nor for 8 KV heads (docs/BENCHMARKS.md, decode kernels).
CPU_MASKED_MAX_SCORES = 1 << 14


def choose_kernel(device: torch.device, rows_per_kv_head: int, kv_heads: int = 1, kept_rows: int = 0) -> str:
    """What "auto" runs for `rows_per_kv_head` query rows (batch x GQA group x new tokens) on `device`,
    over a layer of `kv_heads` heads keeping `kept_rows` packed prefix rows in all."""
    if device.type == "cpu" and rows_per_kv_head < CPU_FUSED_MIN_ROWS:
        return "masked" if kv_heads <= 4 and kv_heads * kept_rows <= CPU_MASKED_MAX_SCORES else "loop"
    return "fused"


def auto_attention(
    query: torch.Tensor,
    prefix: RaggedPrefix,
    suffix_keys: torch.Tensor,
    suffix_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The kernel `choose_kernel` picks for this call's shape and device."""
    batch, q_heads, q_len, _ = query.shape
    rows = batch * (q_heads // prefix.kv_heads) * q_len
    chosen = choose_kernel(query.device, rows, prefix.kv_heads, prefix.keys.shape[0])
    return KERNELS[chosen](query, prefix, suffix_keys, suffix_values, attention_mask, scaling)


def get_kernel(name: str) -> Kernel:
    if name == AUTO:
        return auto_attention
    if name not in KERNELS:
        raise InputError(f"unknown decode kernel {name!r}: choose one of {', '.join([AUTO, *KERNELS])}")
    return KERNELS[name]
