"""Decode kernels: attend a batch of queries to a layer's ragged compressed prefix plus the suffix.

A kernel is a function `(query, prefix, suffix_keys, suffix_values, attention_mask, scaling) -> output`
(shapes in `kvstore.decode.kernels.loop.ragged_attention`), chosen by name: "loop" (the reference,
one small attention per KV head), "fused" (the layer's prefix in one varlen call on CUDA, plus
one call for the suffix) or "auto", the one measured best on the device (docs/BENCHMARKS.md).
Adding one is one new module plus one line here (and its name in `kvstore.config.DECODE_KERNELS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstore.decode.kernels.fused import fused_attention
from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.prefix import RaggedPrefix
from kvstore.errors import InputError

Kernel = Callable[[torch.Tensor, RaggedPrefix, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]

KERNELS: dict[str, Kernel] = {"loop": ragged_attention, "fused": fused_attention}
AUTO = "auto"
DEFAULT_KERNEL = AUTO
# What "auto" picks per device type: fused ops where they exist on the device, else the loop.
AUTO_KERNELS = {"cuda": "fused", "cpu": "fused"}


def kernel_name(name: str, device: torch.device | str | None) -> str:
    """The kernel `name` stands for on `device` ("auto" resolves per device; others stay themselves)."""
    if name != AUTO:
        if name not in KERNELS:
            raise InputError(f"unknown decode kernel {name!r}: choose one of {', '.join([AUTO, *KERNELS])}")
        return name
    return AUTO_KERNELS.get(torch.device(device or "cpu").type, "loop")


def get_kernel(name: str, device: torch.device | str | None = None) -> Kernel:
    return KERNELS[kernel_name(name, device)]
