"""Blobs: round trips for both formats and all quantizations, the header, and refusing bad blobs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvstore.kv.compressed import CompressedKV
from kvstore.kv.quant import KEYS_AXIS, VALUES_AXIS, bits_for, quantize
from kvstore.storage.blob import (
    FORMAT_VERSION,
    METADATA_KEY,
    BlobCorruptError,
    BlobError,
    BlobHeader,
    BlobMissingError,
    BlobModelError,
    BlobVersionError,
)
from kvstore.storage.formats import FORMATS, format_of
from tests.factories import PRESS, describe_blob, half_step, load_blob, random_compressed, save_blob


def header_for(compressed: CompressedKV, quant: str = "none", fingerprint: str = "fp-a") -> BlobHeader:
    return BlobHeader.describe(
        compressed,
        model="tiny",
        model_fingerprint=fingerprint,
        tokenizer_fingerprint="tok-a",
        press=PRESS,
        quant=quant,
    )


def assert_same_layout(a: CompressedKV, b: CompressedKV) -> None:
    assert torch.equal(a.token_ids, b.token_ids) and a.prefix_length == b.prefix_length
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.lengths, y.lengths) and torch.equal(x.positions, y.positions)
        assert x.keys.dtype == y.keys.dtype and x.keys.shape == y.keys.shape and x.values.shape == y.values.shape


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_round_trip(tmp_path: Path, fmt: str, quant: str) -> None:
    compressed = random_compressed()
    path = tmp_path / f"ctx{FORMATS[fmt]}"
    written = save_blob(path, compressed, header_for(compressed, quant))
    loaded, header = load_blob(path, "fp-a")
    assert header == written and len(header.checksum) == 64
    assert header.lengths == [layer.lengths.tolist() for layer in compressed.layers]
    assert header.original_length == compressed.original_length and header.quant == quant
    assert_same_layout(compressed, loaded)
    bits = bits_for(quant)
    for original, back in zip(compressed.layers, loaded.layers, strict=True):
        for part, axis in (("keys", KEYS_AXIS), ("values", VALUES_AXIS)):
            x, y = getattr(original, part), getattr(back, part)
            if bits is None:
                assert torch.equal(x, y)
            else:
                bound = half_step(quantize(x, bits, axis, header.group_size, original.lengths))
                assert bool(((x - y).abs() <= bound * (1 + 1e-5) + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bfloat16_round_trip_is_exact(tmp_path: Path, fmt: str) -> None:
    compressed = random_compressed(dtype=torch.bfloat16)
    path = tmp_path / f"ctx{FORMATS[fmt]}"
    save_blob(path, compressed, header_for(compressed))
    loaded, header = load_blob(path)
    assert header.dtype == "bfloat16"
    for x, y in zip(compressed.layers, loaded.layers, strict=True):
        assert y.keys.dtype == torch.bfloat16 and torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def test_quantized_blobs_are_smaller(tmp_path: Path) -> None:
    compressed = random_compressed(head_dim=64, length=200)
    sizes = {}
    for quant in ("none", "int8", "int4"):
        path = tmp_path / f"{quant}.safetensors"
        save_blob(path, compressed, header_for(compressed, quant))
        sizes[quant] = path.stat().st_size
    assert sizes["int4"] < sizes["int8"] < sizes["none"] / 3


def test_safetensors_header_is_string_metadata_and_loads_are_memory_mapped(tmp_path: Path) -> None:
    from safetensors import safe_open

    compressed = random_compressed()
    path = tmp_path / "ctx.safetensors"
    written = save_blob(path, compressed, header_for(compressed))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        names = set(handle.keys())
    assert all(isinstance(v, str) for v in metadata.values())
    assert json.loads(metadata[METADATA_KEY])["format_version"] == FORMAT_VERSION
    assert {"token_ids", "layer.0.keys", "layer.0.values", "layer.0.lengths", "layer.0.positions"} <= names
    assert describe_blob(path) == written
    loaded, _ = load_blob(path)
    maps = Path("/proc/self/maps")
    if maps.exists():  # zero-copy: the loaded keys live in a mapping of the blob file itself
        pointer = loaded.layers[1].keys.data_ptr()
        mapped = [line for line in maps.read_text().splitlines() if line.endswith(str(path))]
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
        assert any(lo <= pointer < hi for lo, hi in spans)


def test_zarr_is_a_group_with_one_subgroup_per_layer(tmp_path: Path) -> None:
    import zarr

    compressed = random_compressed(layers=2)
    path = tmp_path / "ctx.zarr"
    written = save_blob(path, compressed, header_for(compressed, "int8"))
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs[METADATA_KEY]["checksum"] == written.checksum
    keys = group["layer.1/keys.q"]
    assert keys.chunks == keys.shape  # one chunk per layer array
    assert type(keys.metadata.codecs[-1]).__name__ == "ZstdCodec"
    assert describe_blob(path) == written


def test_other_model_is_refused(tmp_path: Path) -> None:
    compressed = random_compressed()
    for suffix in FORMATS.values():
        path = tmp_path / f"ctx{suffix}"
        save_blob(path, compressed, header_for(compressed, fingerprint="fp-a"))
        with pytest.raises(BlobModelError, match=r"written by model 'tiny' \(fingerprint fp-a\).*fp-b"):
            load_blob(path, "fp-b")
        load_blob(path)  # no expectation given: no model check


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    compressed = random_compressed()
    for suffix in FORMATS.values():
        path = tmp_path / f"ctx{suffix}"
        save_blob(path, compressed, replace(header_for(compressed), format_version=FORMAT_VERSION + 1))
        with pytest.raises(BlobVersionError, match=f"version {FORMAT_VERSION + 1} is not supported"):
            load_blob(path)
        with pytest.raises(BlobVersionError):
            describe_blob(path)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_flipped_byte_in_safetensors_is_detected(tmp_path: Path, quant: str) -> None:
    compressed = random_compressed(layers=2, length=40)
    clean = tmp_path / "clean.safetensors"
    save_blob(clean, compressed, header_for(compressed, quant))
    data = clean.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    # every byte of the length prefix, a stride through the JSON header, a stride through the tensors
    offsets = [*range(8), *range(8, header_end, 13), *range(header_end, len(data), 37), len(data) - 1]
    for offset in offsets:
        path = tmp_path / "flipped.safetensors"
        path.write_bytes(data)
        flip(path, offset)
        with pytest.raises(BlobError):
            load_blob(path)
    path.write_bytes(data)
    flip(path, header_end + (len(data) - header_end) // 2)
    with pytest.raises(BlobCorruptError, match="checksum"):
        load_blob(path)


def test_flipped_byte_in_zarr_chunks_or_header_is_detected(tmp_path: Path) -> None:
    import zarr

    compressed = random_compressed(layers=1, length=40)
    path = tmp_path / "ctx.zarr"
    save_blob(path, compressed, header_for(compressed, "int8"))
    chunks = [p for p in path.rglob("*") if p.is_file() and p.parent.name in ("c", "0")]
    assert chunks
    for chunk in chunks:
        data = chunk.read_bytes()
        for offset in range(0, len(data), max(1, len(data) // 5)):
            flip(chunk, offset)
            with pytest.raises(BlobCorruptError):
                load_blob(path)
            chunk.write_bytes(data)
    load_blob(path)  # restored: reads again
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs[METADATA_KEY])
    attrs["prefix_length"] += 1  # still consistent with the tensors: only the checksum catches it
    group.attrs[METADATA_KEY] = attrs
    with pytest.raises(BlobCorruptError, match="checksum"):
        load_blob(path)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(BlobMissingError):
        load_blob(tmp_path / "nope.safetensors")
    with pytest.raises(BlobMissingError):
        load_blob(tmp_path / "nope.zarr")
    with pytest.raises(BlobError, match="not a kvstore blob"):
        format_of("x.pt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(BlobCorruptError):
        load_blob(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(BlobCorruptError, match="no kvstore header"):
        load_blob(plain)


def test_header_json_round_trip() -> None:
    header = replace(header_for(random_compressed()), checksum="ab" * 32)
    assert BlobHeader.from_json(header.to_json()) == header
    with pytest.raises(BlobCorruptError):
        BlobHeader.from_json('{"format_version": 1, "model": "x"}')
    with pytest.raises(BlobCorruptError):
        BlobHeader.from_json("[1, 2]")
