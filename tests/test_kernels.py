"""Every decode kernel (and every prefix backend that runs on CPU) equals the reference loop kernel."""

from __future__ import annotations

import pytest
import torch

from kvstore.config import DECODE_KERNELS, Settings, SettingsError
from kvstore.decode.kernels import AUTO, KERNELS, auto_attention, choose_kernel, get_kernel
from kvstore.decode.kernels.fused import fused_attention
from kvstore.decode.kernels.loop import ragged_attention
from kvstore.decode.kernels.prefix_ops import choose_prefix_op
from kvstore.decode.prefix import RaggedPrefix
from kvstore.errors import InputError

CPU_BACKENDS = ["heads", "flex"]  # "varlen" needs CUDA; flex runs unfused on CPU, which checks its block mask


def _case(groups: int, batch: int, q_len: int, channels: int | None, seed: int):
    """Random per-head lengths with one empty and one full head, a causal suffix, row 1 left-padded."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads, dim, context, s_len = 4, 16, 50, q_len + 3
    lengths = [0, context, *torch.randint(1, context, (kv_heads - 2,), generator=gen).tolist()]
    lengths = [lengths[i] for i in torch.randperm(kv_heads, generator=gen).tolist()]
    kept = [
        torch.randperm(dim, generator=gen)[:channels].sort().values for _ in range(kv_heads) if channels is not None
    ]
    key_dim = channels or dim
    prefix = RaggedPrefix.from_heads(
        [torch.randn(n, key_dim, generator=gen) for n in lengths],
        [torch.randn(n, dim, generator=gen) for n in lengths],
        kept or None,
    )
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=gen)
    suffix_keys = torch.randn(batch, kv_heads, s_len, dim, generator=gen)
    suffix_values = torch.randn(batch, kv_heads, s_len, dim, generator=gen)
    mask = torch.ones(q_len, s_len, dtype=torch.bool).tril(diagonal=s_len - q_len)[None, None].repeat(batch, 1, 1, 1)
    if batch > 1:
        mask[1, :, :, :2] = False
    return query, prefix, suffix_keys, suffix_values, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize(("batch", "q_len"), [(1, 1), (8, 1), (1, 5), (8, 5)])
@pytest.mark.parametrize("channels", [None, 11])
def test_fused_kernel_equals_reference(backend: str, groups: int, batch: int, q_len: int, channels: int | None) -> None:
    case = _case(groups, batch, q_len, channels, seed=groups * 100 + batch * 10 + q_len)
    expected = ragged_attention(*case, 0.3)
    ours = fused_attention(*case, 0.3, backend=backend)
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(set(KERNELS) - {"loop"}))
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize(("batch", "q_len"), [(1, 1), (8, 1), (1, 5), (8, 5)])
@pytest.mark.parametrize("channels", [None, 11])
def test_every_kernel_equals_reference(name: str, groups: int, batch: int, q_len: int, channels: int | None) -> None:
    case = _case(groups, batch, q_len, channels, seed=groups * 100 + batch * 10 + q_len + 1)
    torch.testing.assert_close(KERNELS[name](*case, 0.3), ragged_attention(*case, 0.3), atol=2e-6, rtol=2e-5)


def test_every_registered_kernel_equals_reference_with_transformers_mask_forms() -> None:
    """None (causal implied) and an additive float mask give what the boolean mask gives."""
    query, prefix, suffix_keys, suffix_values, mask = _case(4, 8, 3, None, seed=9)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    for name, kernel in (*KERNELS.items(), (AUTO, auto_attention)):
        for given in (mask, additive):
            torch.testing.assert_close(
                kernel(query, prefix, suffix_keys, suffix_values, given, 0.25),
                ragged_attention(query, prefix, suffix_keys, suffix_values, mask, 0.25),
                atol=2e-6,
                rtol=2e-5,
                msg=f"kernel {name}",
            )
    causal = mask[:1]  # batch row 0 is plain causal, which is what no mask means
    torch.testing.assert_close(
        fused_attention(query[:1], prefix, suffix_keys[:1], suffix_values[:1], None, 0.25),
        ragged_attention(query[:1], prefix, suffix_keys[:1], suffix_values[:1], causal, 0.25),
        atol=2e-6,
        rtol=2e-5,
    )


def test_a_prefix_with_nothing_kept_attends_to_the_suffix_only() -> None:
    query, _, suffix_keys, suffix_values, mask = _case(2, 2, 2, None, seed=3)
    empty = RaggedPrefix.from_heads([torch.zeros(0, 16)] * 4, [torch.zeros(0, 16)] * 4)
    for backend in CPU_BACKENDS:
        ours = fused_attention(query, empty, suffix_keys, suffix_values, mask, 0.3, backend=backend)
        torch.testing.assert_close(ours, ragged_attention(query, empty, suffix_keys, suffix_values, mask, 0.3))


def test_prefix_op_selection_by_device_dtype_and_widths() -> None:
    cuda, cpu, mps = torch.device("cuda:0"), torch.device("cpu"), torch.device("mps")
    assert choose_prefix_op(cuda, torch.bfloat16, 128, 128, has_varlen=True) == "varlen"
    assert choose_prefix_op(cuda, torch.float16, 64, 64, has_varlen=True) == "varlen"
    assert choose_prefix_op(cuda, torch.bfloat16, 128, 128, has_varlen=False) == "flex"  # an older torch
    assert choose_prefix_op(cuda, torch.float32, 128, 128, has_varlen=True) == "flex"  # flash is half precision
    assert choose_prefix_op(cuda, torch.bfloat16, 96, 128, has_varlen=True) == "flex"  # ThinK: narrower keys
    assert choose_prefix_op(cuda, torch.bfloat16, 512, 512, has_varlen=True) == "flex"  # beyond flash's widths
    for device in (cpu, mps):
        assert choose_prefix_op(device, torch.bfloat16, 128, 128, has_varlen=True) == "heads"


def test_auto_picks_per_device_and_shape_and_names_match_the_settings() -> None:
    assert set(DECODE_KERNELS) == {AUTO, *KERNELS}
    cuda, cpu = torch.device("cuda:1"), torch.device("cpu")
    assert choose_kernel(cuda, 3) == choose_kernel(cuda, 256) == "fused"
    assert choose_kernel(cpu, 3, kv_heads=3, kept_rows=3000) == "masked"  # few heads, short: one masked matmul
    assert choose_kernel(cpu, 3, kv_heads=3, kept_rows=12000) == "loop"  # longer: the masked arithmetic costs more
    assert choose_kernel(cpu, 3, kv_heads=8, kept_rows=1000) == "loop"  # many heads: per-head matmuls
    assert choose_kernel(cpu, 32) == "fused"  # a batch, or the question's own tokens
    assert get_kernel(AUTO) is auto_attention and get_kernel("loop") is KERNELS["loop"]
    for groups, batch in ((1, 1), (8, 8)):
        case = _case(groups, batch, 1, None, seed=5)
        torch.testing.assert_close(auto_attention(*case, 0.3), ragged_attention(*case, 0.3), atol=2e-6, rtol=2e-5)
    with pytest.raises(InputError, match="unknown decode kernel 'tiled'"):
        get_kernel("tiled")
    assert Settings(kernel="loop").kernel == "loop"
    with pytest.raises(SettingsError, match="KVSTORE_KERNEL"):
        Settings(kernel="tiled")


@pytest.mark.model
def test_greedy_answers_on_the_default_model_are_the_same_tokens_with_every_kernel(real_model) -> None:
    from kvstore.compress import compress
    from kvstore.decode.cache import CompressedCache
    from kvstore.decode.generation import GenerationOptions, decode_tokens
    from kvstore.presses import parse_press_spec

    document = (
        "The archive of the northern guild is kept in Tallinn. Its keeper, Mirja Saar, opens it on Tuesdays. "
        "The guild's seal shows a heron holding a key, and its motto is 'patience builds ships'. " * 4
    )
    compressed = compress(real_model, document, parse_press_spec("kvzip", 0.75))
    frame = real_model.frame
    questions = [frame.question_ids(q) for q in ("Which city keeps the archive?", "What does the seal show?")]
    options = GenerationOptions(max_new_tokens=16)
    answers = {
        name: torch.stack(
            list(decode_tokens(real_model, CompressedCache(compressed, kernel=name), questions, {-1}, options))
        )
        for name in (*KERNELS, AUTO)
    }
    reference = answers.pop("loop")
    for name, tokens in answers.items():
        assert tokens.tolist() == reference.tolist(), name


@pytest.mark.parametrize("chosen", ["loop", "fused"])
def test_the_client_decodes_through_the_kernel_its_settings_name(chosen: str, store_home, monkeypatch) -> None:
    from kvstore import KVStore
    from tests.tiny import sample_text, tiny_model

    monkeypatch.setenv("KVSTORE_KERNEL", chosen)
    loaded = tiny_model("llama")
    with KVStore(model=loaded.name, ratio=0.5) as kv:
        kv._models[loaded.name] = loaded  # an in-memory test model instead of a download
        [part] = kv.ingest_text(sample_text(120), source="note")
        context = kv.context(part.record.id)
        assert context.cache.kernel == chosen
        assert context.cache.layers[0].kernel is KERNELS[chosen]
        assert kv.ask(part.record.id, "the vault", max_new_tokens=3).completion_tokens >= 1


def test_the_masked_kernel_hands_big_calls_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its scores span every head's rows: past MAX_SCORES elements the bounded loop kernel runs instead."""
    from kvstore.decode.kernels import masked

    handed = []
    monkeypatch.setattr(masked, "MAX_SCORES", 100)
    monkeypatch.setattr(masked, "ragged_attention", lambda *args: handed.append(1) or ragged_attention(*args))
    case = _case(4, 8, 5, None, seed=2)
    torch.testing.assert_close(masked.masked_attention(*case, 0.3), ragged_attention(*case, 0.3))
    assert handed == [1]
