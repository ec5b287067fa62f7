"""Whole-model decode step on the default model: compressed cache per kernel vs a dense cache of the kept size.

    PYTHONPATH=. python benchmarks/decode_step_bench.py                 # 4K / 8K / 16K, batch 1 and 8, quiet + loaded
    PYTHONPATH=. python benchmarks/decode_step_bench.py --lengths 4096 --load quiet

`decode_bench.py` times attention alone; this times what a user waits for per generated token:
one forward pass of the real model (embeddings, every layer's projections, MLP, norms, attention,
the last token's logits) for one new token per question. Caches, K/V random at the model's shape:

* compressed: a `CompressedCache` keeping 25% of the context, per-head lengths uneven (as
  decode_bench), through each kernel;
* dense floor: a transformers `StaticCache` of the compressed mean length (the same work laid out
  densely, one copy per question: the issue's floor);
* full: a `StaticCache` of the whole context (batch 1 only: at batch 8 it is GBs per step).

Every cache of one configuration is timed in the same rounds, interleaved, best round reported.
With load, decode_bench's second process (attention of the 8B-like shape at 16K) runs throughout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import StaticCache

from benchmarks.decode_bench import KEPT, NAMES, contention, interleaved, uneven_lengths
from kvstore.decode.cache import CompressedCache
from kvstore.engine.models import LoadedModel, load_model
from kvstore.kv.compressed import CompressedKV, CompressedLayer


@dataclass
class StepRow:
    tokens: int
    batch: int
    load: str
    kernel: str
    compressed_ms: float
    floor_ms: float
    full_ms: float | None

    @property
    def vs_floor(self) -> float:
        return self.compressed_ms / self.floor_ms


def random_compressed(loaded: LoadedModel, tokens: int, gen: torch.Generator) -> CompressedKV:
    """A context of `tokens` tokens keeping KEPT of each layer's pairs, unevenly over heads, positions sorted."""
    shape = loaded.kv_shape
    layers = []
    for _ in range(shape.layers):
        keep = torch.zeros(shape.kv_heads, tokens, dtype=torch.bool)
        for head, kept in enumerate(uneven_lengths(shape.kv_heads, tokens, gen)):
            keep[head, torch.randperm(tokens, generator=gen)[:kept]] = True
        dense = torch.randn(2, shape.kv_heads, tokens, shape.head_dim, generator=gen)
        layers.append(CompressedLayer.from_dense(dense[0], dense[1], keep))
    return CompressedKV(layers, torch.zeros(tokens, dtype=torch.int32), prefix_length=0)


def dense_cache(loaded: LoadedModel, batch: int, length: int, gen: torch.Generator) -> StaticCache:
    """`length` dense rows per head and question, with room for the step's new token written in place."""
    shape = loaded.kv_shape
    cache = StaticCache(config=loaded.model.config, max_cache_len=length + 1)
    for layer in range(shape.layers):
        keys, values = torch.randn(2, batch, shape.kv_heads, length, shape.head_dim, generator=gen)
        cache.update(keys, values, layer)
    return cache


def step_fn(loaded: LoadedModel, cache: StaticCache | CompressedCache, batch: int, position: int) -> Callable[[], None]:
    """One new token per question at `position`; the cache is returned to its prefix afterwards."""
    input_ids = torch.full((batch, 1), 1, dtype=torch.long)
    positions = torch.full((batch, 1), position, dtype=torch.long)

    def step() -> None:
        with torch.inference_mode():
            loaded.model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        if isinstance(cache, CompressedCache):
            cache.reset()
        else:
            for layer in cache.layers:  # the next step overwrites the same slot
                layer.cumulative_length.fill_(position)

    return step


def time_config(loaded: LoadedModel, tokens: int, batch: int, rounds: int, load: str) -> list[StepRow]:
    gen = torch.Generator().manual_seed(tokens + batch)
    compressed = random_compressed(loaded, tokens, gen)
    mean = round(compressed.kept_pairs / (loaded.kv_shape.layers * loaded.kv_shape.kv_heads))
    steps = {("floor", ""): step_fn(loaded, dense_cache(loaded, batch, mean, gen), batch, mean)}
    if batch == 1:
        steps[("full", "")] = step_fn(loaded, dense_cache(loaded, batch, tokens, gen), batch, tokens)
    for name in NAMES:
        steps[("compressed", name)] = step_fn(loaded, CompressedCache(compressed, kernel=name), batch, tokens)
    times = interleaved(steps, rounds)
    ms = {key: 1000 * min(values) for key, values in times.items()}
    full = ms.get(("full", ""))
    return [StepRow(tokens, batch, load, name, ms[("compressed", name)], ms[("floor", "")], full) for name in NAMES]


def table(rows: list[StepRow]) -> str:
    lines = [
        "| tokens | batch | load | kernel | compressed ms | dense floor ms | full ms | compressed / dense floor |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        full = f"{r.full_ms:.1f}" if r.full_ms is not None else "-"
        lines.append(
            f"| {r.tokens // 1024}K | {r.batch} | {r.load} | {r.kernel} | {r.compressed_ms:.1f} | "
            f"{r.floor_ms:.1f} | {full} | {r.vs_floor:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name (default: the store's default model)")
    parser.add_argument("--lengths", default="4096,8192,16384", help="comma-separated context lengths")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per configuration (best reported)")
    parser.add_argument("--load", default="quiet,second-process", help="quiet, second-process, or both")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    loaded = load_model(args.model)
    print(f"{loaded.name}, torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.rounds}")
    print(f"{KEPT:.0%} kept; {loaded.kv_shape}")
    rows: list[StepRow] = []
    for load in args.load.split(","):
        with contention(load):
            for tokens in (int(n) for n in args.lengths.split(",")):
                for batch in (int(b) for b in args.batches.split(",")):
                    rows += time_config(loaded, tokens, batch, args.rounds, load)
                    print("\n".join(table(rows[-len(NAMES) :]).splitlines()[2:]), flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
