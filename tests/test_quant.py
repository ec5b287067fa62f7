"""int8 / int4 group quantization: the half-step error bound, packing, and head-respecting groups."""

from __future__ import annotations

import pytest
import torch

from kvstore.kv.quant import (
    KEYS_AXIS,
    VALUES_AXIS,
    bits_for,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from tests.factories import half_step


def within_bound(x: torch.Tensor, q) -> bool:
    """|x - x_hat| <= step / 2, allowing float32 rounding of the affine map."""
    error = (x.float() - dequantize(q)).abs()
    return bool((error <= half_step(q) * (1 + 1e-5) + 1e-6 * x.float().abs()).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", [KEYS_AXIS, VALUES_AXIS])
@pytest.mark.parametrize("group_size", [32, 24])
def test_error_is_at_most_half_a_step(bits: int, axis: int, group_size: int) -> None:
    generator = torch.Generator().manual_seed(bits * 100 + axis * 10 + group_size)
    lengths = torch.tensor([37, 0, 70, 5, 33], dtype=torch.int32)
    x = torch.randn(int(lengths.sum()), 64, generator=generator) * 3
    x[:, 7] += 50  # an outlier channel, as real keys have
    q = quantize(x, bits, axis, group_size, lengths)
    assert within_bound(x, q)
    levels = (1 << bits) - 1
    assert float(half_step(q).max()) <= float(x.max() - x.min()) / levels  # never worse than one global range


@pytest.mark.parametrize("bits", [8, 4])
def test_storage_sizes(bits: int) -> None:
    lengths = torch.tensor([33, 32], dtype=torch.int32)
    x = torch.randn(65, 63)  # odd element count: int4 pads one nibble
    q = quantize(x, bits, KEYS_AXIS, 32, lengths)
    assert q.data.dtype == torch.uint8 and q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    assert q.data.numel() == (x.numel() if bits == 8 else (x.numel() + 1) // 2)
    assert q.scales.shape == (2 + 1, 63)  # head 0: groups of 32 + 1 rows, head 1: one group
    v = quantize(x, bits, VALUES_AXIS, 32, lengths)
    assert v.scales.shape == (65, 2)  # 63 channels: groups of 32 + 31


def test_key_groups_do_not_straddle_heads() -> None:
    # Head 0 is tiny, head 1 huge; a group spanning both would give head 0 a huge step.
    lengths = torch.tensor([20, 20], dtype=torch.int32)
    x = torch.cat([torch.rand(20, 16) * 1e-3, torch.rand(20, 16) * 1e3])
    q = quantize(x, 8, KEYS_AXIS, 32, lengths)
    error = (x - dequantize(q)).abs()
    assert float(error[:20].max()) <= (1e-3 / 255 + 2**-24) / 2  # 2**-24: float16 spacing of such a small step
    assert within_bound(x, q)


def test_constant_and_tiny_groups_are_exact_enough() -> None:
    x = torch.full((10, 8), 0.3)
    q = quantize(x, 4, VALUES_AXIS)
    assert within_bound(x, q)
    assert float((dequantize(q) - x).abs().max()) < 1e-3
    zeros = torch.zeros(5, 8)
    assert torch.equal(dequantize(quantize(zeros, 8, KEYS_AXIS)), zeros)


def test_bfloat16_input_and_output() -> None:
    x = torch.randn(40, 32).to(torch.bfloat16)
    q = quantize(x, 8, KEYS_AXIS, lengths=torch.tensor([25, 15], dtype=torch.int32))
    assert within_bound(x, q)
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_empty_tensor() -> None:
    x = torch.zeros(0, 16)
    q = quantize(x, 4, KEYS_AXIS, lengths=torch.tensor([0, 0], dtype=torch.int32))
    assert dequantize(q).shape == (0, 16)


def test_int4_packing_round_trip() -> None:
    codes = torch.randint(0, 16, (11,), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.numel() == 6
    assert torch.equal(unpack_int4(packed, 11), codes)


def test_invalid_input_is_refused() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(4, 4), 3, KEYS_AXIS)
    with pytest.raises(ValueError, match="lengths"):
        quantize(torch.zeros(4, 4), 8, KEYS_AXIS, lengths=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="float16 range"):
        quantize(torch.tensor([[1e6, 0.0]]), 8, KEYS_AXIS)
    with pytest.raises(ValueError, match="unknown quantization"):
        bits_for("int3")
    assert bits_for("none") is None and bits_for("int8") == 8 and bits_for("int4") == 4
