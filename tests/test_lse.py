"""Attention with log-sum-exp: which fused op runs where, and GQA without copying keys per query head."""

from __future__ import annotations

import pytest
import torch

from kvstore.engine.lse import attention_with_lse, attention_with_lse_math, choose_lse_op


def test_lse_op_selection_by_device_dtype_and_widths() -> None:
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert choose_lse_op(cuda, torch.bfloat16, 128, 128) == "cuda_flash"
    assert choose_lse_op(cuda, torch.float16, 64, 64) == "cuda_flash"
    assert choose_lse_op(cuda, torch.float32, 128, 128) == "cuda_efficient"
    assert choose_lse_op(cuda, torch.bfloat16, 512, 512) == "cuda_efficient"  # beyond flash's head sizes
    assert choose_lse_op(cpu, torch.float32, 64, 64) == "cpu_flash"
    assert choose_lse_op(cpu, torch.bfloat16, 64, 64) == "cpu_flash"
    assert choose_lse_op(cpu, torch.float64, 64, 64) == "math"
    assert choose_lse_op(cpu, torch.float32, 48, 64) == "math"  # ThinK's narrower keys: one head size needed
    assert choose_lse_op(mps, torch.float32, 64, 64) == "math"


@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_fused_and_math_equal_attention_over_repeated_keys(groups: int, causal: bool) -> None:
    gen = torch.Generator().manual_seed(groups)
    kv_heads, q_len, dim = 2, 9, 16
    query = torch.randn(1, kv_heads * groups, q_len, dim, generator=gen)
    key, value = (torch.randn(1, kv_heads, q_len, dim, generator=gen) for _ in range(2))
    expected = attention_with_lse_math(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), 0.25, causal
    )
    for op in ("cpu_flash", "math"):
        output, lse = attention_with_lse(query, key, value, 0.25, causal, op=op)
        torch.testing.assert_close(output, expected[0], atol=1e-5, rtol=1e-5, msg=op)
        torch.testing.assert_close(lse, expected[1], atol=1e-5, rtol=1e-5, msg=op)


def test_non_causal_gqa_never_repeats_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The context keys (32K tokens on GPU workers) must not be copied per query head."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("keys were repeated per query head")

    query, key = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 40, 16)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    output, lse = attention_with_lse(query, key, key, 0.25)
    assert output.shape == (1, 8, 5, 16) and lse.shape == (1, 8, 5)
