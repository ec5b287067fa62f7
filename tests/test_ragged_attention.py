"""The per-head ragged attention equals a dense, padded and masked reference."""

from __future__ import annotations

import pytest
import torch

from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.prefix import RaggedPrefix


def _dense_reference(query, prefix_keys, prefix_values, suffix_keys, suffix_values, suffix_mask, scaling):
    """Pad every head's prefix to the longest, mask the padding, softmax in float64."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = len(prefix_keys)
    groups = q_heads // kv_heads
    longest = max(k.shape[0] for k in prefix_keys)
    keys = torch.zeros(batch, kv_heads, longest, dim, dtype=torch.float64)
    values = torch.zeros_like(keys)
    valid = torch.zeros(kv_heads, longest, dtype=torch.bool)
    for h, (k, v) in enumerate(zip(prefix_keys, prefix_values, strict=True)):
        keys[:, h, : k.shape[0]], values[:, h, : v.shape[0]], valid[h, : k.shape[0]] = k.double(), v.double(), True
    keys = torch.cat([keys, suffix_keys.double()], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([values, suffix_values.double()], dim=2).repeat_interleave(groups, dim=1)
    allowed = torch.cat(
        [
            valid.repeat_interleave(groups, 0)[None, :, None, :].expand(batch, -1, q_len, -1),
            suffix_mask.expand(batch, q_heads, q_len, -1),
        ],
        dim=-1,
    )
    scores = (query.double() @ keys.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs @ values).transpose(1, 2)


@pytest.mark.parametrize("seed", range(4))
def test_ragged_equals_dense_masked_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, groups, q_len, s_len, dim = 2, 3, 3, 4, 6, 16
    lengths = torch.randint(1, 40, (kv_heads,), generator=gen).tolist()
    prefix_keys = [torch.randn(n, dim, generator=gen) for n in lengths]
    prefix_values = [torch.randn(n, dim, generator=gen) for n in lengths]
    suffix_keys = torch.randn(batch, kv_heads, s_len, dim, generator=gen)
    suffix_values = torch.randn(batch, kv_heads, s_len, dim, generator=gen)
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=gen)
    # causal over the suffix, and row 1 left-padded by two tokens
    causal = torch.ones(q_len, s_len, dtype=torch.bool).tril(diagonal=s_len - q_len)
    mask = causal[None, None].repeat(batch, 1, 1, 1)
    mask[1, :, :, :2] = False
    ours = ragged_attention(
        query, RaggedPrefix.from_heads(prefix_keys, prefix_values), suffix_keys, suffix_values, mask, 0.25
    )
    expected = _dense_reference(query, prefix_keys, prefix_values, suffix_keys, suffix_values, mask, 0.25)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_ragged_query_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long queries are processed in row blocks to bound memory; blocking must not change the output."""
    import kvstore.decode.kernels.loop as attention

    gen = torch.Generator().manual_seed(7)
    prefix = RaggedPrefix.from_heads(
        [torch.randn(n, 8, generator=gen) for n in (5, 9)], [torch.randn(n, 8, generator=gen) for n in (5, 9)]
    )
    suffix_k, suffix_v = torch.randn(1, 2, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    query = torch.randn(1, 4, 12, 8, generator=gen)
    whole = ragged_attention(query, prefix, suffix_k, suffix_v, None, 0.3)
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", 50)
    blocked = ragged_attention(query, prefix, suffix_k, suffix_v, None, 0.3)
    torch.testing.assert_close(blocked, whole)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_lse_attention_equals_math_path(causal: bool) -> None:
    from kvstore.engine.lse import attention_with_lse, attention_with_lse_math

    gen = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, 4, 12, 16, generator=gen) for _ in range(3))
    fused_out, fused_lse = attention_with_lse(query, key, value, 0.25, causal)
    math_out, math_lse = attention_with_lse_math(query, key, value, 0.25, causal)
    torch.testing.assert_close(fused_out, math_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_lse, math_lse, atol=1e-5, rtol=1e-5)
    # bfloat16 inputs (KVzip's reconstruction pass): bfloat16 output, float32 log-sum-exp, same values
    low_out, low_lse = attention_with_lse(query.bfloat16(), key.bfloat16(), value.bfloat16(), 0.25, causal)
    assert low_out.dtype == torch.bfloat16 and low_lse.dtype == torch.float32
    torch.testing.assert_close(low_out.float(), math_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(low_lse, math_lse, atol=3e-2, rtol=1e-2)
    # the plain-math path (what GPUs run) takes bfloat16 too
    low_math_out, low_math_lse = attention_with_lse_math(
        query.bfloat16(), key.bfloat16(), value.bfloat16(), 0.25, causal
    )
    torch.testing.assert_close(low_math_out.float(), math_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(low_math_lse, math_lse, atol=3e-2, rtol=1e-2)


def test_merged_partial_attention_equals_attention_over_the_union() -> None:
    from kvstore.engine.lse import attention_with_lse_math, merge_attention

    gen = torch.Generator().manual_seed(4)
    query, key, value = (
        torch.randn(1, 2, 5, 8, generator=gen),
        *(torch.randn(1, 2, 30, 8, generator=gen) for _ in range(2)),
    )
    whole = attention_with_lse_math(query, key, value, 0.3)
    parts = [attention_with_lse_math(query, key[:, :, i : i + 10], value[:, :, i : i + 10], 0.3) for i in (0, 10, 20)]
    merged = merge_attention(*parts)
    torch.testing.assert_close(merged[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[1], whole[1], atol=1e-5, rtol=1e-5)
