"""Several stored contexts as one prompt: a composed compressed prefix, nothing prefilled again.

The composition keeps the first context's chat-template head, then each context's kept document
K/V in the order given; the other contexts' heads are dropped. Segment j's document starts where
segment j-1's ends (in original-length terms), and its keys are rotated by that offset with the
model's own rotary embedding (`kvstore.engine.rotary`), so the result is what prefilling each
document separately at its composed positions, attending only to the head and itself, would give.
What it lacks is attention across documents (each was prefilled alone).

The result is an ordinary `CompressedKV` (packed per head, ascending positions), so every decode
kernel and `CompressedCache` work on it unchanged; its memory is the sum of the parts' kept pairs.
ThinK-pruned layers compose exactly: a rotation mixes channel pairs, so a composed head stores every
channel any of its rows is non-zero on; with several moved segments that is usually all of them (the
composed layer then holds full keys: ThinK's saving does not survive composition).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.engine.models import LoadedModel
from kvstore.engine.rotary import PositionError, check_rotary, rotate_keys
from kvstore.errors import InputError
from kvstore.kv.compressed import CompressedKV, CompressedLayer


def composed_length(parts: Sequence[CompressedKV]) -> int:
    """Context tokens of the composition: the first head plus every document."""
    return parts[0].prefix_length + sum(p.original_length - p.prefix_length for p in parts)


def check_composable(loaded: LoadedModel, parts: Sequence[CompressedKV], reserve: int = 0) -> None:
    """Refuse, naming what differs or the lengths, parts that cannot make one prompt for `loaded`."""
    if not parts:
        raise InputError("nothing to compose: give at least one stored context")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if (len(part.layers), part.kv_heads, part.head_dim) != (len(first.layers), first.kv_heads, first.head_dim):
            raise InputError(
                f"context {i} has {len(part.layers)} layers x {part.kv_heads} KV heads x {part.head_dim} dims, "
                f"context 0 has {len(first.layers)} x {first.kv_heads} x {first.head_dim}: not the same model"
            )
    window = getattr(loaded.model.config, "max_position_embeddings", None)
    total = composed_length(parts)
    if window is not None and total + reserve > window:
        lengths = " + ".join(f"{p.original_length - p.prefix_length:,}" for p in parts)
        raise PositionError(
            f"the composed context is {total:,} tokens ({first.prefix_length} template + documents {lengths})"
            f"{f' plus {reserve:,} for the question and answer' if reserve else ''}, beyond the model's window "
            f"of {window:,} tokens: compose fewer or shorter contexts"
        )
    if len(parts) > 1:
        check_rotary(loaded)


def _dense_keys(layer: CompressedLayer, rows: slice, head: int) -> torch.Tensor:
    """Keys of some rows of one head at full head_dim (zeros on pruned channels)."""
    keys = layer.keys[rows]
    if layer.key_channels is None:
        return keys
    dense = keys.new_zeros(keys.shape[0], layer.head_dim)
    return dense.index_copy_(1, layer.key_channels[head].long().to(keys.device), keys)


def _segments(layer: CompressedLayer, head: int, drop_below: int) -> tuple[slice, torch.Tensor]:
    """The rows of `head` at positions >= drop_below (positions ascend within a head)."""
    starts = torch.cumsum(layer.lengths.long(), 0) - layer.lengths.long()
    begin, end = int(starts[head]), int(starts[head] + layer.lengths[head])
    positions = layer.positions[begin:end]
    first = begin + int(torch.searchsorted(positions.contiguous(), torch.tensor(drop_below, dtype=positions.dtype)))
    return slice(first, end), layer.positions[first:end]


def _compose_layer(
    loaded: LoadedModel, layers: Sequence[CompressedLayer], prefixes: Sequence[int], starts: Sequence[int]
) -> CompressedLayer:
    dtype = layers[0].values.dtype
    pruned = all(layer.key_channels is not None for layer in layers)
    keys, values, positions, lengths = [], [], [], []
    channel_sets = []
    for head in range(layers[0].kv_heads):
        head_keys, head_values, head_positions = [], [], []
        for j, (layer, prefix, start) in enumerate(zip(layers, prefixes, starts, strict=True)):
            rows, pos = _segments(layer, head, 0 if j == 0 else prefix)
            offset = start - prefix
            head_keys.append(rotate_keys(loaded, _dense_keys(layer, rows, head).to(dtype), offset))
            head_values.append(layer.values[rows].to(dtype))
            head_positions.append(pos + offset)
        dense = torch.cat(head_keys)
        if pruned:  # every channel a row of this head is non-zero on (a rotation mixes channel pairs)
            used = (dense != 0).any(dim=0)
            for layer in layers:
                used[layer.key_channels[head].long()] = True
            channel_sets.append(used)
        keys.append(dense)
        values.append(torch.cat(head_values))
        positions.append(torch.cat(head_positions))
        lengths.append(dense.shape[0])
    channels = None
    if pruned:
        width = max(int(used.sum()) for used in channel_sets)
        if width < layers[0].head_dim:
            chosen = []
            for used in channel_sets:  # equal counts per head: fill with the lowest unused channels
                extra = (~used).nonzero()[: width - int(used.sum()), 0]
                chosen.append(torch.cat([used.nonzero()[:, 0], extra]).sort().values)
            channels = torch.stack(chosen).to(torch.int32)
            keys = [k.index_select(1, c.long()) for k, c in zip(keys, channels, strict=True)]
    return CompressedLayer(
        keys=torch.cat(keys).contiguous(),
        values=torch.cat(values).contiguous(),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        positions=torch.cat(positions).to(torch.int32),
        key_channels=channels,
    )


def compose(loaded: LoadedModel, parts: Sequence[CompressedKV], reserve: int = 0) -> CompressedKV:
    """One compressed context from `parts`, in order (module docstring). One part is returned as is.

    `reserve` tokens (question and answer) must still fit the model's window after the composition.
    """
    check_composable(loaded, parts, reserve)
    if len(parts) == 1:
        return parts[0]
    prefixes = [p.prefix_length for p in parts]
    starts, position = [], parts[0].prefix_length
    for part in parts:
        starts.append(position)
        position += part.original_length - part.prefix_length
    layers = [
        _compose_layer(loaded, [p.layers[i] for p in parts], prefixes, starts) for i in range(len(parts[0].layers))
    ]
    token_ids = torch.cat(
        [parts[0].token_ids[: prefixes[0]]] + [p.token_ids[p.prefix_length :].to(torch.int32) for p in parts]
    )
    return CompressedKV(layers, token_ids, prefixes[0])
