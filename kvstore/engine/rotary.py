"""Moving stored keys to other positions with the model's own rotary embedding.

Stored keys carry RoPE at the positions they were prefilled at. RoPE is relative: rotating a key by
an offset d equals having prefilled it d positions later, R(p + d) k = R(d) R(p) k, for every RoPE
whose angles are linear in the position (default, linear, llama3, yarn: rope_theta and scaling as
the config says). The rotation uses the model's own rotary module and its modeling file's
`apply_rotary_pos_emb`, so partial rotary dimensions and scaling variants follow the model.
Position-dependent frequency switches (dynamic NTK, longrope) are not relative and are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from kvstore.engine.models import LoadedModel
from kvstore.errors import InputError

# RoPE variants whose frequencies depend on the sequence length: a fixed rotation cannot move keys.
_NOT_RELATIVE = ("dynamic", "longrope")


class PositionError(InputError):
    """A model or a length that composition cannot handle; the message names it."""


def _rotary(loaded: LoadedModel) -> tuple[torch.nn.Module, Callable[..., tuple[torch.Tensor, torch.Tensor]]]:
    model = loaded.model
    backbone = getattr(model, "model", model)
    rotary = getattr(backbone, "rotary_emb", None)
    layers = getattr(backbone, "layers", None)
    module = sys.modules.get(type(layers[0].self_attn).__module__) if layers else None
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        raise PositionError(
            f"model {loaded.name!r} ({type(model).__name__}) does not use rotary position embeddings: "
            "its stored contexts cannot be moved to new positions, so they cannot be composed"
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _NOT_RELATIVE:
        raise PositionError(
            f"model {loaded.name!r} uses {rope_type!r} RoPE scaling, whose rotations depend on the sequence length: "
            "stored contexts cannot be composed"
        )
    return rotary, apply


def check_rotary(loaded: LoadedModel) -> None:
    """Refuse, with a clear error, a model whose stored keys cannot be re-positioned."""
    _rotary(loaded)


def rotate_keys(loaded: LoadedModel, keys: torch.Tensor, offset: int) -> torch.Tensor:
    """Keys [rows, head_dim] (post-RoPE at their positions) as if prefilled `offset` positions later."""
    if offset == 0 or keys.shape[0] == 0:
        return keys
    rotary, apply = _rotary(loaded)
    work = keys.to(torch.float32)
    positions = torch.tensor([[offset]], device=keys.device)
    cos, sin = rotary(work, positions)  # [1, 1, head_dim], scaled by the variant's attention factor
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = cos / scale, sin / scale  # the factor was applied once at prefill: do not apply it again
    _, moved = apply(work[None, None], work[None, None], cos, sin)
    return moved[0, 0].to(keys.dtype)
