"""The tensors of a blob: a CompressedKV as a flat set of named tensors (quantized as its header says) and back.

    token_ids                       int32 [original_length]
    layer.{i}.lengths               int32 [kv_heads]      rows per head
    layer.{i}.positions             int32 [kept]          original token positions
    layer.{i}.keys / .values        dtype [kept, head_dim]              (quant "none")
    layer.{i}.keys.q / .scales / .zeros  (and the same for values)      (quant "int8" / "int4")
    layer.{i}.key_channels          int32 [kv_heads, channels]  only where ThinK pruned key channels:
                                    that layer's keys are then [kept, channels] (quantized likewise)

Every format stores exactly these tensors and the header; `kvstore.storage.validate` says in
which order a read checks them, `verify` (table + checksum) and `check_values` run on what a
format read back before `unpack` touches a value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.kv.quant import KEYS_AXIS, VALUES_AXIS, QuantizedTensor, bits_for, dequantize, quantize
from kvstore.storage.blob import BlobCorruptError, BlobHeader, check_dtype, dtype_name
from kvstore.storage.validate import Expected, Table, check_expected, check_tensors

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    return _DTYPES[check_dtype(name)]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bits as int16
        flat = flat.view(torch.int16)
    return memoryview(np.ascontiguousarray(flat.numpy())).cast("B")


def checksum(header: BlobHeader, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the header (minus its checksum) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(replace(header, checksum="").to_json().encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\0{name}\0{dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def sealed(compressed: CompressedKV, header: BlobHeader) -> tuple[BlobHeader, dict[str, torch.Tensor]]:
    """A context's tensors as the header says, and the header with their checksum filled in."""
    tensors = payload(compressed, header)
    return replace(header, checksum=checksum(header, tensors)), tensors


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # A private CPU copy: safetensors refuses tensors that share storage (e.g. a loaded blob's views).
    return tensor.detach().to("cpu", copy=True).contiguous()


def payload(compressed: CompressedKV, header: BlobHeader) -> dict[str, torch.Tensor]:
    """The named tensors of a blob, quantized as the header says."""
    bits = bits_for(header.quant)
    tensors = {"token_ids": _owned(compressed.token_ids.to(torch.int32))}
    for i, layer in enumerate(compressed.layers):
        lengths = _owned(layer.lengths.to(torch.int32))
        tensors[f"layer.{i}.lengths"] = lengths
        tensors[f"layer.{i}.positions"] = _owned(layer.positions.to(torch.int32))
        if layer.key_channels is not None:
            tensors[f"layer.{i}.key_channels"] = _owned(layer.key_channels.to(torch.int32))
        for part, tensor, axis in (("keys", layer.keys, KEYS_AXIS), ("values", layer.values, VALUES_AXIS)):
            if bits is None:
                tensors[f"layer.{i}.{part}"] = _owned(tensor)
                continue
            quantized = quantize(tensor, bits, axis, header.group_size, lengths)
            for suffix, data in quantized.tensors().items():
                tensors[f"layer.{i}.{part}.{suffix}"] = data.contiguous()
    return tensors


def unpack(tensors: dict[str, torch.Tensor], header: BlobHeader) -> CompressedKV:
    """Rebuild the CompressedKV (dequantized to the header's dtype) from verified tensors."""
    bits, dtype = bits_for(header.quant), parse_dtype(header.dtype)
    layers = []
    for i in range(header.layers):
        lengths = tensors[f"layer.{i}.lengths"]
        rows = int(lengths.sum())
        kv = []
        widths = {"keys": header.key_width(i), "values": header.head_dim}
        for part, axis in (("keys", KEYS_AXIS), ("values", VALUES_AXIS)):
            if bits is None:
                kv.append(tensors[f"layer.{i}.{part}"])
                continue
            q = QuantizedTensor(
                tensors[f"layer.{i}.{part}.q"],
                tensors[f"layer.{i}.{part}.scales"],
                tensors[f"layer.{i}.{part}.zeros"],
                lengths,
                bits,
                axis,
                header.group_size,
                (rows, widths[part]),
            )
            kv.append(dequantize(q, dtype))
        channels = tensors.get(f"layer.{i}.key_channels")
        layers.append(CompressedLayer(kv[0], kv[1], lengths, tensors[f"layer.{i}.positions"], channels))
    return CompressedKV(layers, tensors["token_ids"], header.prefix_length)


def verify(header: BlobHeader, tensors: dict[str, torch.Tensor], where: str) -> None:
    """The tensors read back are exactly the declared ones and the checksum matches."""
    check_tensors(header, {name: (dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()}, where)
    actual = checksum(header, tensors)
    if actual != header.checksum:
        raise BlobCorruptError(
            f"blob {where} is corrupt: checksum {actual[:16]}... does not match its header ({header.checksum[:16]}...)"
        )


def _ascending_within_heads(values: torch.Tensor, lengths: list[int]) -> bool:
    """Whether `values` (heads' runs packed one after another) strictly ascend inside every run."""
    rising = values.diff() > 0
    starts = torch.tensor(lengths[:-1], dtype=torch.long).cumsum(0)
    starts = starts[(starts > 0) & (starts < values.numel())]
    rising[starts - 1] = True  # where one head's run ends and the next begins
    return bool(rising.all())


def check_values(header: BlobHeader, tensors: dict[str, torch.Tensor], vocab: int | None, where: str) -> None:
    """What the checksum cannot vouch for (it seals whatever was written): values a decode would trust.

    Token ids within the vocabulary, stored lengths equal to the header's, kept positions inside
    the context and ascending per head, key channels inside the head and ascending, every float finite.
    """

    def refuse(field: str, why: str) -> None:
        raise BlobCorruptError(f"blob {where}: {why} ({field})")

    ids = tensors["token_ids"].long()
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        refuse("token_ids", f"token ids span [{int(ids.min())}, {int(ids.max())}], outside the vocabulary of {vocab}")
    for i, lengths in enumerate(header.lengths):
        if tensors[f"layer.{i}.lengths"].tolist() != lengths:
            refuse("lengths", f"layer {i} stores per-head lengths that differ from its header")
        positions = tensors[f"layer.{i}.positions"].long()
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= header.original_length):
            refuse("positions", f"layer {i} keeps positions outside the {header.original_length}-token context")
        if not _ascending_within_heads(positions, lengths):
            refuse("positions", f"layer {i} keeps positions that do not ascend within a head")
        channels = tensors.get(f"layer.{i}.key_channels")
        if channels is not None and channels.numel():
            channels = channels.long()
            inside = int(channels.min()) >= 0 and int(channels.max()) < header.head_dim
            if not inside or not bool((channels.diff(dim=1) > 0).all()):
                refuse("key_channels", f"layer {i} names key channels outside [0, {header.head_dim}) or not ascending")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            refuse(name, "NaN or infinite values")


def decode_checked(
    header: BlobHeader,
    table: Table,
    read: Callable[[], dict[str, torch.Tensor]],
    expected: Expected | None,
    where: str,
) -> CompressedKV:
    """What every format does once it parsed a blob's header and listed its tensors, in the order of
    `kvstore.storage.validate`: expectations, table, read, checksum, values, then unpack."""
    check_expected(header, expected, where)
    check_tensors(header, table, where)
    tensors = read()
    verify(header, tensors, where)
    check_values(header, tensors, expected.shape.vocab if expected and expected.shape else None, where)
    compressed = unpack(tensors, header)
    if header.quant != "none" and not compressed.finite:  # finite scales can still overflow a float16 result
        raise BlobCorruptError(f"blob {where} dequantizes to values beyond {header.dtype} (scales)")
    return compressed
