"""Crafted blobs: what anyone who can write the store can plant, headers and tensors edited and re-sealed.

`forge` builds a valid context's header and tensors, lets a mutation edit them (the header as a
plain dict, so it may hold values no writer would produce), recomputes the checksum over the
result, as an attacker can, and writes the container. `CASES` is the table of lies a reader must
refuse, each with the field its refusal has to name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.kv.shape import KVShape
from kvstore.storage.backends.local import LocalBackend
from kvstore.storage.blob import BlobHeader
from kvstore.storage.formats import FORMATS, get_format
from kvstore.storage.payload import checksum, payload
from tests.factories import PRESS, random_compressed

Mutation = Callable[[dict, dict[str, torch.Tensor]], None]
SHAPE = KVShape(layers=3, kv_heads=3, head_dim=16, window=128, vocab=1000)  # what the reading "model" has


def base_context(pruned: bool = False, dtype: torch.dtype = torch.float32) -> CompressedKV:
    """3 layers x 3 KV heads x 16 channels, 80 tokens; `pruned`: layer 1 keeps 8 key channels (ThinK)."""
    compressed = random_compressed(layers=3, kv_heads=3, head_dim=16, length=80, dtype=dtype, seed=7)
    if pruned:
        layer = compressed.layers[1]
        channels = torch.tensor([[0, 2, 3, 5, 7, 8, 11, 15]] * 3, dtype=torch.int32)
        keys = layer.keys.index_select(1, torch.tensor([0, 2, 3, 5, 7, 8, 11, 15]))
        compressed.layers[1] = CompressedLayer(keys, layer.values, layer.lengths, layer.positions, channels)
    return compressed


def forge(
    path: Path,
    quant: str,
    mutate: Mutation | None = None,
    pruned: bool = False,
    fingerprint: str = "fp-a",
    dtype: torch.dtype = torch.float32,
) -> BlobHeader:
    """Write a blob at `path` (format by suffix) whose header and tensors `mutate` edited, checksum re-sealed."""
    compressed = base_context(pruned, dtype)
    header = BlobHeader.describe(
        compressed, model="tiny", model_fingerprint=fingerprint, tokenizer_fingerprint="tok-a", press=PRESS, quant=quant
    )
    tensors = payload(compressed, header)
    raw = json.loads(json.dumps(asdict(header)))
    if mutate is not None:
        mutate(raw, tensors)
    forged = BlobHeader(**raw)
    forged = replace(forged, checksum=checksum(forged, tensors))
    fmt = get_format(next(name for name, suffix in FORMATS.items() if path.name.endswith(suffix)))
    LocalBackend(path.parent).put(path.name, fmt.pack(tensors, forged, {}))
    return forged


# -- mutations ------------------------------------------------------------------------------------


def header_field(field: str, value: object) -> Mutation:
    def mutate(raw: dict, tensors: dict) -> None:
        raw[field] = value

    return mutate


def head_length(value: object, layer: int = 0, head: int = 0) -> Mutation:
    def mutate(raw: dict, tensors: dict) -> None:
        raw["lengths"][layer][head] = value

    return mutate


def tensor(name: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    def mutate(raw: dict, tensors: dict) -> None:
        tensors[name] = edit(tensors[name].clone()).contiguous()

    return mutate


def element(name: str, index: int, value: int) -> Mutation:
    return tensor(name, lambda t: t.index_fill_(0, torch.tensor([index]), value))


def first_float(name_end: str, value: float) -> Mutation:
    """Set one element of layer 0's first tensor named like `name_end` (keys / values / scales) to `value`."""

    def mutate(raw: dict, tensors: dict) -> None:
        name = next(n for n in sorted(tensors) if n.startswith("layer.0.") and n.endswith(name_end))
        edited = tensors[name].clone()
        edited.view(-1)[0] = value
        tensors[name] = edited

    return mutate


def one_layer(raw: dict, tensors: dict) -> None:
    """A one-layer blob (for a three-layer model): header and tensors agree with each other."""
    raw["lengths"], raw["key_channels"] = raw["lengths"][:1], raw["key_channels"][:1]
    for name in [n for n in tensors if n.startswith("layer.") and not n.startswith("layer.0.")]:
        del tensors[name]


def keys_width(width: int) -> Mutation:
    def mutate(raw: dict, tensors: dict) -> None:
        name = "layer.0.keys" if "layer.0.keys" in tensors else "layer.0.keys.scales"
        tensors[name] = tensors[name][:, :width].contiguous()

    return mutate


def swap_positions(raw: dict, tensors: dict) -> None:
    positions = tensors["layer.0.positions"].clone()
    positions[[5, 6]] = positions[[6, 5]]
    tensors["layer.0.positions"] = positions


def swap_head_lengths(raw: dict, tensors: dict) -> None:
    """The stored lengths tensor disagrees with the header (the header itself stays consistent)."""
    tensors["layer.0.lengths"] = tensors["layer.0.lengths"].flip(0).contiguous()


def extra_tensor(raw: dict, tensors: dict) -> None:
    tensors["layer.0.extra"] = torch.zeros(4)


def missing_tensor(raw: dict, tensors: dict) -> None:
    del tensors["layer.2.positions"]


def channel(value: int) -> Mutation:
    return tensor("layer.1.key_channels", lambda t: t.index_fill_(1, torch.tensor([7]), value))


def channels_descending(raw: dict, tensors: dict) -> None:
    tensors["layer.1.key_channels"] = tensors["layer.1.key_channels"].flip(1).contiguous()


@dataclass(frozen=True)
class Case:
    """A lie and the field its refusal names; `quants`: which quantizations it applies to."""

    name: str
    mutate: Mutation
    field: str
    quants: tuple[str, ...] = ("none", "int8", "int4")
    pruned: bool = False


CASES = [
    Case("negative length", head_length(-5), "lengths"),
    Case("lengths summing to 2^26 rows", head_length(1 << 26), "lengths"),
    Case("lengths summing to 2^40 rows", head_length(1 << 40), "lengths"),
    Case("lengths summing to 2^22 rows", head_length(1 << 22), "lengths"),
    Case("a length that is a string", head_length("12"), "lengths"),
    Case("a length that is a boolean", head_length(True), "lengths"),
    Case("lengths not summing to the rows stored", head_length(3), "layer.0"),
    Case("a layer with fewer heads", header_field("lengths", [[20, 20, 20], [20, 20], [20, 20, 20]]), "lengths"),
    Case("no layers at all", header_field("lengths", []), "lengths"),
    Case("a one-layer blob for a three-layer model", one_layer, "layers"),
    Case("stored lengths differing from the header", swap_head_lengths, "lengths"),
    Case("head_dim 0", header_field("head_dim", 0), "head_dim"),
    Case("head_dim of another model", header_field("head_dim", 32), "head_dim"),
    Case("keys of the wrong width", keys_width(8), "layer.0.keys"),
    Case(
        "keys in float16 under a float32 header", tensor("layer.0.keys", lambda t: t.half()), "layer.0.keys", ("none",)
    ),
    Case("an unknown K/V dtype", header_field("dtype", "int8"), "dtype"),
    Case("NaN keys", first_float("keys", float("nan")), "layer.0.keys", ("none",)),
    Case("infinite values", first_float("values", float("inf")), "layer.0.values", ("none",)),
    Case("NaN quantization scales", first_float("keys.scales", float("nan")), "scales", ("int8", "int4")),
    Case("infinite quantization minimums", first_float("values.zeros", float("-inf")), "zeros", ("int8", "int4")),
    Case("a position beyond the context", tensor("layer.0.positions", lambda t: t.fill_(10**6)), "positions"),
    Case(
        "a negative position",
        element("layer.0.positions", 9, -1),
        "positions",
    ),
    Case("positions not ascending in a head", swap_positions, "positions"),
    Case("original_length 10^9", header_field("original_length", 10**9), "original_length"),
    Case("prefix_length beyond the context", header_field("prefix_length", 500), "prefix_length"),
    Case(
        "a token id beyond the vocabulary",
        element("token_ids", 3, 10**8),
        "token_ids",
    ),
    Case("a negative token id", element("token_ids", 3, -2), "token_ids"),
    Case("quant group size 0", header_field("group_size", 0), "group_size"),
    Case("quant group size negative", header_field("group_size", -32), "group_size"),
    Case("quant group size 10^9", header_field("group_size", 10**9), "group_size"),
    Case("quant group size not the one used", header_field("group_size", 64), "scales", ("int8", "int4")),
    Case("an unknown quantization", header_field("quant", "int3"), "quant"),
    Case("key_channels not matching the layers", header_field("key_channels", [0, 8]), "key_channels", pruned=True),
    Case("a key channel beyond head_dim", channel(99), "key_channels", pruned=True),
    Case("key channels not ascending", channels_descending, "key_channels", pruned=True),
    Case("an unexpected tensor", extra_tensor, "unexpected"),
    Case("a missing tensor", missing_tensor, "missing"),
    Case("a format version from the future", header_field("format_version", 99), "version"),
]
