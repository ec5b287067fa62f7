"""The prepared GPU run: prefill, KVzip scoring, decode full vs compressed per kernel, peak GPU memory.

    PYTHONPATH=. python benchmarks/gpu_run.py --out results/gpu_run.json     # CUDA, a few minutes
    PYTHONPATH=. python benchmarks/gpu_run.py --small                        # CPU, seconds (tests run it)

An 8B-like random Llama (32 layers, hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336)
in bfloat16, built directly on the GPU, with the tests' offline tokenizer (KVzip's prompts need
one). Per context length (8K / 16K / 32K random token ids): the chunked prefill; KVzip scoring at
0.75 removed (time and the peak memory it adds on top of the prefilled cache: bounded by one
2,000-token chunk, not by the document); decode of batches of 1 and 8 questions for `--steps`
tokens with the full and the compressed cache through each kernel, plus each prefix backend of the
fused kernel timed alone on the layers' prefixes. Targets (issue 16): scoring <= 1.5x a prefill;
compressed decode >= 2x faster than full at 16K+.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvstore.compress import cut, pack
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, decode_tokens
from kvstore.decode.kernels import KERNELS
from kvstore.decode.kernels.fused import fused_attention
from kvstore.decode.kernels.prefix_ops import choose_prefix_op
from kvstore.engine.models import LoadedModel, prepare_model
from kvstore.presses import parse_press_spec
from kvstore.presses.base import prefill_context
from tests.tiny import tiny_tokenizer

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=40960, rope_theta=500000.0),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096),
}  # fmt: skip


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPES[shape])
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    with device:  # initialise in place: 8B parameters never pass through host memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return prepare_model(f"random-{shape}", model, tokenizer, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> float:
    """Reset the peak counter; returns the memory in use now (MiB)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def decode_ms(loaded: LoadedModel, cache: CompressedCache, batch: int, steps: int) -> float:
    """Milliseconds per decode step (after the question's own step) for `batch` questions."""
    question = loaded.frame.question_ids("What is the special magic number?")
    options = GenerationOptions(max_new_tokens=steps + 1)
    tokens = decode_tokens(loaded, cache, [question] * batch, {-1}, options)
    next(tokens)  # the question itself
    _, seconds = timed(loaded.device, lambda: sum(1 for _ in tokens))
    return 1000 * seconds / steps


def backend_ms(cache: CompressedCache, batch: int, heads: int, rounds: int = 5) -> dict[str, float]:
    """Each fused prefix backend alone: one decode step's attention over every layer's prefix."""
    layer = cache.layers[0]
    kv_heads, dim = layer.prefix.kv_heads, layer.prefix.values.shape[-1]
    device, dtype = layer.prefix.values.device, layer.prefix.values.dtype
    query = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype)
    suffix = torch.randn(batch, kv_heads, 24, dim, device=device, dtype=dtype)
    backends = ["heads", "flex"] + (["varlen"] if device.type == "cuda" else [])
    result = {}
    for backend in backends:
        attend = functools.partial(fused_attention, backend=backend)

        def step(attend: Callable = attend) -> None:
            for layer in cache.layers:
                attend(query, layer.prefix, suffix, suffix, None, dim**-0.5)

        try:
            step()  # warm-up (and compilation for flex on CUDA)
            result[backend] = 1000 * min(timed(device, step)[1] for _ in range(rounds))
        except Exception as exc:  # a backend this torch build lacks: say so instead of stopping the run
            result[backend] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    return result


def run_length(loaded: LoadedModel, tokens: int, batches: list[int], steps: int) -> dict[str, object]:
    device = loaded.device
    press = parse_press_spec("kvzip", 0.75)
    ids = torch.randint(10, len(loaded.tokenizer), (tokens,), generator=torch.Generator().manual_seed(tokens))
    base = reset_peak(device)
    run, prefill_s = timed(device, lambda: prefill_context(loaded, ids.tolist(), press))
    prefill_peak = peak_mib(device) - base
    before_scoring = reset_peak(device)
    packed, score_s = timed(device, functools.partial(cut, run, press))
    row: dict[str, object] = {
        "tokens": tokens,
        "prefill_s": prefill_s,
        "score_s": score_s,
        "score_over_prefill": score_s / prefill_s,
        "prefill_peak_extra_mib": prefill_peak,
        "score_peak_extra_mib": peak_mib(device) - before_scoring,
        "kept_fraction": packed.kept_pairs / packed.total_pairs,
    }
    full_kv = pack(run, run.keep_all())
    del run
    decode: dict[str, dict[str, float]] = {}
    for kernel in KERNELS:
        for name, compressed in (("full", full_kv), ("compressed", packed)):
            cache = CompressedCache(compressed, device=device, kernel=kernel)
            for batch in batches:
                decode[f"{kernel} {name} batch {batch}"] = {
                    "ms_per_step": decode_ms(loaded, cache, batch, steps),
                    "cache_mib": cache.nbytes / 2**20,
                }
            del cache
    for batch in batches:
        full = decode[f"fused full batch {batch}"]["ms_per_step"]
        decode[f"fused full / compressed batch {batch}"] = (
            full / decode[f"fused compressed batch {batch}"]["ms_per_step"]
        )
    row["decode"] = decode
    heads = loaded.model.config.num_attention_heads
    compressed = CompressedCache(packed, device=device)
    row["fused_backend_ms"] = {f"batch {b}": backend_ms(compressed, b, heads) for b in batches}
    first = compressed.layers[0].prefix
    row["backend_chosen"] = choose_prefix_op(device, first.values.dtype, first.keys.shape[-1], first.values.shape[-1])
    return row


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny model on CPU in float32 (what the test runs)")
    parser.add_argument("--lengths", default=None, help="context lengths (default 8192,16384,32768; small: 300,600)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per case")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.small:
        device, dtype, shape, lengths = torch.device("cpu"), torch.float32, "small", "300,600"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --small on CPU")
        device, dtype, shape, lengths = torch.device("cuda"), torch.bfloat16, "8b", "8192,16384,32768"
    loaded, load_s = timed(device, lambda: build_model(shape, device, dtype))
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": f"random {shape} Llama, {dtype}",
        "build_s": load_s,
        "weights_mib": peak_mib(device),
        "lengths": [],
    }
    batches = [int(b) for b in args.batches.split(",")]
    for tokens in (int(n) for n in (args.lengths or lengths).split(",")):
        row = run_length(loaded, tokens, batches, args.steps)
        report["lengths"].append(row)
        print(json.dumps(row, indent=1, default=str), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
