"""Refuse a blob whose header or tensor table lies, before any of its tensors is read.

A blob is untrusted input: anyone who can write the store or the index can craft one and seal it
with a matching checksum. Reading follows one order in every format:

1. the header's own fields (`BlobHeader.check_structure`: bounded, consistent);
2. the reader's expectations (`Expected`): the model's fingerprint and K/V geometry, the
   index record's checksum;
3. the tensor table (names, dtypes, shapes as the container declares them) against what the
   header implies (`declared_tensors`), so nothing larger than the validated header is allocated;
4. the tensors are read and the checksum verified (`payload.verify`), then their values are
   checked (`payload.check_values`: positions, channels, token ids, finite numbers);
5. only then `payload.unpack` dequantizes.

Every refusal is a `BlobError` naming the field. Importing this module loads no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvstore.kv.shape import KVShape
from kvstore.storage.blob import BlobCorruptError, BlobHeader, BlobModelError

Table = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype name, shape)


@dataclass(frozen=True)
class Expected:
    """What a reader requires of a blob; None fields are not checked."""

    fingerprint: str | None = None  # of the model that will decode it
    shape: KVShape | None = None  # that model's K/V geometry
    checksum: str | None = None  # what the index record says


def check_expected(header: BlobHeader, expected: Expected | None, where: str) -> None:
    """The header against the model and the record that led to this blob."""
    if expected is None:
        return
    if expected.fingerprint is not None and header.model_fingerprint != expected.fingerprint:
        raise BlobModelError(
            f"blob was written by model {header.model!r} (fingerprint {header.model_fingerprint}), "
            f"not by the requested model (fingerprint {expected.fingerprint}); re-ingest the document with it"
        )
    if expected.checksum is not None and header.checksum != expected.checksum:
        raise BlobCorruptError(f"blob {where} does not match its index record (checksum differs)")
    shape = expected.shape
    if shape is None:
        return
    found = {
        "layers": header.layers,
        "kv heads": len(header.lengths[0]),
        "head_dim": header.head_dim,
    }
    wanted = {"layers": shape.layers, "kv heads": shape.kv_heads, "head_dim": shape.head_dim}
    for field, value in found.items():
        if value != wanted[field]:
            raise BlobCorruptError(f"blob {where} has {value} {field}, the model has {wanted[field]} ({field})")
    if header.original_length > shape.window:
        raise BlobCorruptError(
            f"blob {where} declares {header.original_length} context tokens, beyond the model's window of "
            f"{shape.window} (original_length)"
        )


def _groups(lengths: list[int], group_size: int) -> int:
    return sum(-(-n // group_size) for n in lengths)


def declared_tensors(header: BlobHeader) -> Table:
    """Every tensor a blob with this (structurally checked) header holds, with its dtype and shape."""
    table: Table = {"token_ids": ("int32", (header.original_length,))}
    for i, lengths in enumerate(header.lengths):
        rows, heads = sum(lengths), len(lengths)
        table[f"layer.{i}.lengths"] = ("int32", (heads,))
        table[f"layer.{i}.positions"] = ("int32", (rows,))
        if header.pruned(i):
            table[f"layer.{i}.key_channels"] = ("int32", (heads, header.key_channels[i]))
        for part, cols in (("keys", header.key_width(i)), ("values", header.head_dim)):
            if header.quant == "none":
                table[f"layer.{i}.{part}"] = (header.dtype, (rows, cols))
                continue
            codes = rows * cols if header.quant == "int8" else -(-rows * cols // 2)
            stats = (
                (_groups(lengths, header.group_size), cols)
                if part == "keys"  # keys: groups of rows within each head, per channel
                else (rows, -(-cols // header.group_size))  # values: groups of channels, per row
            )
            table[f"layer.{i}.{part}.q"] = ("uint8", (codes,))
            table[f"layer.{i}.{part}.scales"] = ("float16", stats)
            table[f"layer.{i}.{part}.zeros"] = ("float16", stats)
    return table


_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint8": 1}


def declared_bytes(header: BlobHeader) -> int:
    """Bytes of every tensor the header implies: what reading the blob may allocate, at most."""
    return sum(math.prod(shape) * _ITEM_BYTES[dtype] for dtype, shape in declared_tensors(header).values())


def check_tensors(header: BlobHeader, found: Table, where: str) -> None:
    """The container's tensor table is exactly what the header implies: nothing missing, extra or resized."""
    declared = declared_tensors(header)
    missing, extra = sorted(declared.keys() - found.keys()), sorted(found.keys() - declared.keys())
    if missing or extra:
        raise BlobCorruptError(f"blob {where} has missing tensors {missing[:5]} / unexpected tensors {extra[:5]}")
    for name, (dtype, shape) in declared.items():
        if found[name] != (dtype, shape):
            actual_dtype, actual_shape = found[name]
            raise BlobCorruptError(
                f"blob {where}: tensor {name!r} is {actual_dtype} {list(actual_shape)}, its header implies "
                f"{dtype} {list(shape)}"
            )
