"""Decode kernels: attend a batch of queries to a layer's ragged compressed prefix plus the suffix.

A kernel is a function `(query, prefix, suffix_keys, suffix_values, suffix_mask, scaling) -> output`
(shapes in `kvstore.decode.kernels.loop.ragged_attention`), chosen by name. Adding one is one new
module plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.prefix import RaggedPrefix

Kernel = Callable[[torch.Tensor, RaggedPrefix, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]

KERNELS: dict[str, Kernel] = {"loop": ragged_attention}
DEFAULT_KERNEL = "loop"


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown decode kernel {name!r}: choose one of {', '.join(KERNELS)}")
    return KERNELS[name]
