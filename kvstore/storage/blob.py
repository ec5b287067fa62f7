"""(De)serialize one compressed context: safetensors (default) or zarr v3, with a versioned header.

Both formats store the same payload, a flat set of named tensors:

    token_ids                       int32 [original_length]
    layer.{i}.lengths               int32 [kv_heads]      rows per head
    layer.{i}.positions             int32 [kept]          original token positions
    layer.{i}.keys / .values        dtype [kept, head_dim]              (quant "none")
    layer.{i}.keys.q / .scales / .zeros  (and the same for values)      (quant "int8" / "int4")
    layer.{i}.key_channels          int32 [kv_heads, channels]  only where ThinK pruned key channels:
                                    that layer's keys are then [kept, channels] (quantized likewise)

and the same header (`BlobHeader`: what wrote the blob and how to read it back). The checksum is a
sha256 over the header (without the checksum field) and every tensor's name, dtype, shape and raw
bytes in name order, so it is independent of the container and catches a flipped byte anywhere.
Version 2 added the key channels (`BlobHeader.key_channels`, one count per layer, 0 = all).
Version 1 blobs have none and are still read; older readers refuse version 2 cleanly instead of
misreading pruned keys. Nothing is ever unpickled: safetensors holds only raw tensors plus string
metadata, zarr only arrays plus JSON attributes. Writers write exactly the path they are given;
atomic publication (temp name, fsync, rename) is the store's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kvstore.errors import DataError
from kvstore.kv.compressed import CompressedKV, CompressedLayer
from kvstore.kv.quant import DEFAULT_GROUP_SIZE, KEYS_AXIS, VALUES_AXIS, QuantizedTensor, bits_for, dequantize, quantize

FORMAT_VERSION = 2  # what this code writes
READABLE_VERSIONS = (1, 2)  # version 1: no key channel pruning (no `key_channels` in the header)
METADATA_KEY = "kvstore"  # safetensors metadata key / zarr group attribute holding the header JSON
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BlobError(DataError):
    """A blob cannot be used; the message says why and what to do."""


class BlobMissingError(BlobError, FileNotFoundError):
    """The blob file or directory does not exist."""


class BlobVersionError(BlobError):
    """Written with a blob format version this code does not read."""


class BlobModelError(BlobError):
    """Written by a different model (weights fingerprint) than the caller's."""


class BlobCorruptError(BlobError):
    """Unreadable, incomplete, or the checksum does not match the content."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise BlobCorruptError(f"unsupported K/V dtype {name!r} in blob header")
    return _DTYPES[name]


@dataclass
class BlobHeader:
    """Everything needed to trust and decode a blob, stored inside it as JSON."""

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str  # of the K/V the blob decodes to: float32 / float16 / bfloat16
    press: dict[str, Any]
    quant: str  # none / int8 / int4
    original_length: int
    prefix_length: int
    head_dim: int
    lengths: list[list[int]]  # [layer][kv head]: kept rows
    key_channels: list[int] = field(default_factory=list)  # [layer]: key channels stored per head, 0 = all
    group_size: int = DEFAULT_GROUP_SIZE
    checksum: str = ""  # sha256, filled in by the writer
    format_version: int = FORMAT_VERSION

    @classmethod
    def describe(
        cls,
        compressed: CompressedKV,
        *,
        model: str,
        model_fingerprint: str,
        tokenizer_fingerprint: str,
        press: dict[str, Any],
        quant: str = "none",
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> BlobHeader:
        """The header of a compressed context about to be written (checksum still empty)."""
        bits_for(quant)
        return cls(
            model=model,
            model_fingerprint=model_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint,
            dtype=dtype_name(compressed.layers[0].keys.dtype),
            press=json.loads(json.dumps(press, default=str)),
            quant=quant,
            original_length=compressed.original_length,
            prefix_length=compressed.prefix_length,
            head_dim=compressed.head_dim,
            lengths=[[int(n) for n in layer.lengths.tolist()] for layer in compressed.layers],
            key_channels=[
                0 if layer.key_channels is None else int(layer.key_channels.shape[1]) for layer in compressed.layers
            ],
            group_size=group_size,
        )

    def to_json(self) -> str:
        raw = asdict(self)
        if self.format_version == 1:  # version 1 headers had no key channels: keep their JSON (and checksum)
            raw.pop("key_channels")
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: object) -> BlobHeader:
        """Parse a stored header: the version is checked first, so future layouts are refused cleanly."""
        if not isinstance(raw, dict):
            raise BlobCorruptError("blob header is not a JSON object")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            readable = " and ".join(map(str, READABLE_VERSIONS))
            raise BlobVersionError(
                f"blob format version {version!r} is not supported (this kvstore reads versions {readable}); "
                "re-ingest the document"
            )
        try:
            header = cls(**raw)
            bits_for(header.quant)
        except (TypeError, ValueError) as exc:
            raise BlobCorruptError(f"blob header is damaged: {exc}") from exc
        parse_dtype(header.dtype)
        if version != 1 and (
            not isinstance(header.key_channels, list)
            or len(header.key_channels) != header.layers
            or any(not isinstance(n, int) or not 0 <= n <= header.head_dim for n in header.key_channels)
        ):
            raise BlobCorruptError("blob header is damaged: key_channels does not match its layers")
        if json.loads(header.to_json()) != raw:  # a flipped byte that still parses: wrong types or keys
            raise BlobCorruptError("blob header is damaged: it does not re-serialize to itself")
        return header

    @classmethod
    def from_json(cls, text: str | None) -> BlobHeader:
        if not text:
            raise BlobCorruptError("blob has no kvstore header")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise BlobCorruptError(f"blob header is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @property
    def layers(self) -> int:
        return len(self.lengths)

    def pruned(self, layer: int) -> bool:
        """Whether `layer` stores only some key channels (and a `key_channels` tensor)."""
        return bool(self.key_channels) and self.key_channels[layer] > 0

    def key_width(self, layer: int) -> int:
        """Columns of `layer`'s stored keys."""
        return self.key_channels[layer] if self.pruned(layer) else self.head_dim


def check_model(header: BlobHeader, model_fingerprint: str | None) -> None:
    """Refuse a blob written by other weights: its K/V would be meaningless to this model."""
    if model_fingerprint is not None and header.model_fingerprint != model_fingerprint:
        raise BlobModelError(
            f"blob was written by model {header.model!r} (fingerprint {header.model_fingerprint}), "
            f"not by the requested model (fingerprint {model_fingerprint})"
        )


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


def expected_names(header: BlobHeader) -> set[str]:
    parts = (
        ("keys", "values")
        if header.quant == "none"
        else tuple(f"{p}.{s}" for p in ("keys", "values") for s in ("q", "scales", "zeros"))
    )
    names = {"token_ids"}
    for i in range(header.layers):
        names |= {f"layer.{i}.lengths", f"layer.{i}.positions", *(f"layer.{i}.{p}" for p in parts)}
        if header.pruned(i):
            names.add(f"layer.{i}.key_channels")
    return names


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


def verify(header: BlobHeader, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Every expected tensor is there and the checksum matches."""
    names = expected_names(header)
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        raise BlobCorruptError(f"blob {where} has missing tensors {missing[:5]} / unexpected tensors {extra[:5]}")
    actual = checksum(header, tensors)
    if actual != header.checksum:
        raise BlobCorruptError(
            f"blob {where} is corrupt: checksum {actual[:16]}... does not match its header ({header.checksum[:16]}...)"
        )


def fsync_path(path: Path) -> None:
    """fsync a file, or every file and directory under a directory (bottom-up)."""
    if path.is_dir():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files + dirs:
                _fsync_one(Path(root) / name)
    _fsync_one(path)


def fsync_dir(path: Path) -> None:
    """fsync one directory (not its contents): makes a rename or link in it durable."""
    _fsync_one(path)


def _fsync_one(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blob_size(path: Path) -> int:
    """Bytes on disk of a blob file or directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class BlobFormat(Protocol):
    """One container format. `write` returns the header with its checksum filled in."""

    name: str
    suffix: str

    def write(self, path: Path, compressed: CompressedKV, header: BlobHeader) -> BlobHeader: ...

    def read(self, path: Path, model_fingerprint: str | None = None) -> tuple[CompressedKV, BlobHeader]: ...

    def read_header(self, path: Path) -> BlobHeader: ...


def _require(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise BlobMissingError(f"blob {path} does not exist")
    return path


@dataclass(frozen=True)
class SafetensorsFormat:
    """One .safetensors file; the header JSON sits in its string metadata; loads are memory-mapped."""

    name: str = "safetensors"
    suffix: str = ".safetensors"

    def write(self, path: Path, compressed: CompressedKV, header: BlobHeader) -> BlobHeader:
        from safetensors.torch import save_file

        tensors = payload(compressed, header)
        header = replace(header, checksum=checksum(header, tensors))
        save_file(tensors, str(path), metadata={METADATA_KEY: header.to_json()})
        fsync_path(Path(path))
        return header

    def _open(self, path: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(_require(path)), framework="pt", device="cpu")
        except BlobError:
            raise
        except Exception as exc:  # SafetensorError, OSError: a damaged container
            raise BlobCorruptError(f"blob {path} is not a readable safetensors file: {exc}") from exc

    def read_header(self, path: Path) -> BlobHeader:
        with self._open(path) as handle:
            return BlobHeader.from_json((handle.metadata() or {}).get(METADATA_KEY))

    def read(self, path: Path, model_fingerprint: str | None = None) -> tuple[CompressedKV, BlobHeader]:
        with self._open(path) as handle:
            header = BlobHeader.from_json((handle.metadata() or {}).get(METADATA_KEY))
            check_model(header, model_fingerprint)
            try:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # mmap views, no copy
            except Exception as exc:
                raise BlobCorruptError(f"blob {path} has unreadable tensors: {exc}") from exc
        verify(header, tensors, Path(path))
        return unpack(tensors, header), header


def _zarr_path(name: str) -> str:
    """'layer.3.keys.q' -> 'layer.3/keys.q': one zarr subgroup per layer, so a layer reads alone."""
    if name.startswith("layer."):
        _, index, rest = name.split(".", 2)
        return f"layer.{index}/{rest}"
    return name


@dataclass(frozen=True)
class ZarrFormat:
    """One zarr v3 group (a directory) per context; each array is one zstd-compressed chunk per layer."""

    name: str = "zarr"
    suffix: str = ".zarr"
    level: int = 3

    def write(self, path: Path, compressed: CompressedKV, header: BlobHeader) -> BlobHeader:
        import zarr
        from zarr.codecs import ZstdCodec

        tensors = payload(compressed, header)
        header = replace(header, checksum=checksum(header, tensors))
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.attrs[METADATA_KEY] = json.loads(header.to_json())
        for name, tensor in tensors.items():
            stored = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            data = stored.numpy()
            array = group.create_array(
                _zarr_path(name),
                shape=data.shape,
                dtype=data.dtype,
                chunks=tuple(max(1, n) for n in data.shape),
                compressors=ZstdCodec(level=self.level, checksum=True),
                attributes={"torch_dtype": dtype_name(tensor.dtype)},
            )
            array[...] = data
        fsync_path(Path(path))
        return header

    def _group(self, path: Path):
        import zarr

        try:
            return zarr.open_group(str(_require(path)), mode="r", zarr_format=3)
        except BlobError:
            raise
        except Exception as exc:
            raise BlobCorruptError(f"blob {path} is not a readable zarr group: {exc}") from exc

    def read_header(self, path: Path) -> BlobHeader:
        return BlobHeader.from_dict(self._group(path).attrs.get(METADATA_KEY))

    def read(self, path: Path, model_fingerprint: str | None = None) -> tuple[CompressedKV, BlobHeader]:
        group = self._group(path)
        header = BlobHeader.from_dict(group.attrs.get(METADATA_KEY))
        check_model(header, model_fingerprint)
        tensors = {}
        for name in expected_names(header):
            try:
                array = group[_zarr_path(name)]
                tensor = torch.from_numpy(np.asarray(array[...]))
                if array.attrs.get("torch_dtype") == "bfloat16":
                    tensor = tensor.view(torch.bfloat16)
            except Exception as exc:  # missing array, zstd checksum failure, truncated chunk
                raise BlobCorruptError(f"blob {path}: array {name!r} is unreadable: {exc}") from exc
            tensors[name] = tensor
        verify(header, tensors, Path(path))
        return unpack(tensors, header), header


FORMATS: dict[str, BlobFormat] = {"safetensors": SafetensorsFormat(), "zarr": ZarrFormat()}


def get_format(name: str) -> BlobFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown blob format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_for_path(path: Path) -> BlobFormat:
    """Pick the serializer from a blob's suffix (.safetensors / .zarr)."""
    for fmt in FORMATS.values():
        if Path(path).name.endswith(fmt.suffix):
            return fmt
    raise BlobError(f"{path} is not a kvstore blob (expected a .safetensors file or a .zarr directory)")


def read_blob(path: Path, model_fingerprint: str | None = None) -> tuple[CompressedKV, BlobHeader]:
    return format_for_path(path).read(path, model_fingerprint)


def read_header(path: Path) -> BlobHeader:
    return format_for_path(path).read_header(path)
