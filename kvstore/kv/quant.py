"""int8 / int4 group quantization of stored K/V: fewer bytes on disk, dequantized on load.

Asymmetric min/max quantization per group of `group_size` elements:

    step = (max - min) / (2**bits - 1)      x_q = round((x - min) / step)      x ~ x_q * step + min

Keys are grouped per channel across tokens (`axis=0`: each group is up to `group_size` consecutive
rows of one head and one channel; KV outlier channels get their own range) and values per token
across channels (`axis=1`). With `axis=0` groups never straddle two heads of the ragged, head-major
layout: `lengths` (rows per head) is respected and each head's last group may be short.

Error bound: every element is reconstructed within half a step of its group,
|x - dequantize(quantize(x))| <= step / 2 (plus float32 rounding of the affine map). Steps and
minimums are stored in float16, rounded outward (minimum down, step up) so the bound still holds
after that rounding. int4 codes are packed two per byte (low nibble first) in uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.config import DEFAULT_GROUP_SIZE, bits_for

__all__ = ["DEFAULT_GROUP_SIZE", "bits_for"]  # re-exported: the quantization names live in kvstore.config
KEYS_AXIS = 0  # per channel, groups across tokens
VALUES_AXIS = 1  # per token, groups across channels
_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal): keeps every step > 0


@dataclass
class QuantizedTensor:
    """A quantized 2-D tensor as plain tensors plus the few integers needed to undo it."""

    data: torch.Tensor  # uint8: one code per element (int8) or two per byte (int4), row-major
    scales: torch.Tensor  # float16 [groups, cols] (axis 0) or [rows, groups] (axis 1): the step
    zeros: torch.Tensor  # float16, same shape: the group minimum
    lengths: torch.Tensor  # int32 [heads]: rows per head (axis 0 groups stay inside a head)
    bits: int
    axis: int
    group_size: int
    shape: tuple[int, int]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to serialize (everything else is recorded in the blob header)."""
        return {"q": self.data, "scales": self.scales, "zeros": self.zeros}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _row_groups(lengths: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Group index of every row when rows are grouped within each head; and the number of groups."""
    lengths = lengths.to(torch.long)
    per_head = (lengths + group_size - 1) // group_size
    first_group = torch.cumsum(per_head, 0) - per_head
    first_row = torch.cumsum(lengths, 0) - lengths
    head = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    rows = torch.arange(int(lengths.sum()))
    return first_group[head] + (rows - first_row[head]) // group_size, int(per_head.sum())


def _group_index(shape: tuple[int, int], axis: int, lengths: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """[rows, cols] index of each element's group along `axis`, plus the group count along it."""
    rows, cols = shape
    if axis == 0:
        groups, count = _row_groups(lengths, group_size)
        return groups[:, None].expand(rows, cols), count
    groups = torch.arange(cols) // group_size
    return groups[None, :].expand(rows, cols), (cols + group_size - 1) // group_size


def _expand(
    stats: torch.Tensor, axis: int, shape: tuple[int, int], lengths: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Broadcast per-group statistics back to one value per element (float32, [rows, cols])."""
    stats = stats.float()
    if axis == 0:
        return stats.index_select(0, _row_groups(lengths, group_size)[0])
    return stats.repeat_interleave(group_size, dim=1)[:, : shape[1]]


def _round_down_fp16(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float16)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float16)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] two per byte, low nibble first (odd counts get a zero pad)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_int4`: the first `count` codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[:count]


def quantize(
    tensor: torch.Tensor,
    bits: int,
    axis: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    lengths: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize a [rows, cols] tensor in groups of `group_size` along `axis` (0: across rows)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if tensor.dim() != 2 or axis not in (0, 1):
        raise ValueError(f"expected a 2-D tensor and axis 0 or 1, got shape {tuple(tensor.shape)} and axis {axis}")
    x = tensor.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(x).all()) or (x.numel() and float(x.abs().max()) > _FP16_MAX):
        raise ValueError("cannot quantize non-finite values or values beyond the float16 range")
    rows, cols = x.shape
    lengths = (lengths if lengths is not None else torch.tensor([rows])).to(device="cpu", dtype=torch.int32)
    if int(lengths.sum()) != rows:
        raise ValueError(f"lengths sum to {int(lengths.sum())}, but the tensor has {rows} rows")
    index, count = _group_index((rows, cols), axis, lengths, group_size)
    stats_shape = (count, cols) if axis == 0 else (rows, count)
    low = torch.full(stats_shape, float("inf")).scatter_reduce(axis, index, x, "amin")
    high = torch.full(stats_shape, float("-inf")).scatter_reduce(axis, index, x, "amax")
    low, high = low.nan_to_num(0.0, 0.0, 0.0), high.nan_to_num(0.0, 0.0, 0.0)  # empty groups: never read
    levels = (1 << bits) - 1
    zeros = _round_down_fp16(low)
    scales = _round_up_fp16(((high - zeros.float()) / levels).clamp(min=_FP16_TINY))
    step, base = (
        _expand(scales, axis, (rows, cols), lengths, group_size),
        _expand(zeros, axis, (rows, cols), lengths, group_size),
    )
    codes = torch.round((x - base) / step).clamp(0, levels).to(torch.uint8)
    data = pack_int4(codes) if bits == 4 else codes.reshape(-1)
    return QuantizedTensor(data, scales, zeros, lengths, bits, axis, group_size, (rows, cols))


def _codes(q: QuantizedTensor) -> torch.Tensor:
    rows, cols = q.shape
    flat = unpack_int4(q.data, rows * cols) if q.bits == 4 else q.data
    return flat.reshape(rows, cols)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the [rows, cols] tensor (within half a step of every original element)."""
    step = _expand(q.scales, q.axis, q.shape, q.lengths, q.group_size)
    base = _expand(q.zeros, q.axis, q.shape, q.lengths, q.group_size)
    return torch.addcmul(base, _codes(q).float(), step).to(dtype)
