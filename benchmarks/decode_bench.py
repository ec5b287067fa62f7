"""Decode step time of every kernel: full cache, compressed cache, and the dense floor of the same work.

    python benchmarks/decode_bench.py            # 4K / 16K / 32K, both shapes, batch 1 and 8, quiet + loaded
    python benchmarks/decode_bench.py --quick    # 4K and 16K, fewer rounds

One decode step's attention, all layers, through random K/V of a model's attention shape
("smollm2": 30 layers, 3 KV heads x 3 query heads each, head dim 64; "8b": 32 layers, 8 x 4,
head dim 128), float32 on CPU, one new token per question after a 24-token suffix. Caches:

* full: every head keeps the whole context, through the kernel;
* compressed: 25% kept overall, per-head lengths uneven (each head between 6% and 44%), through the kernel;
* dense floor: a dense cache of the compressed mean length plus the suffix, one row per question,
  through torch's SDPA with GQA (what a dense cache of that size costs: the issue's floor);
* shared floor: the same dense K/V read once for the whole batch (the batch folded into the query
  rows): the least time that much K/V can take on this machine.

Only `--distinct-layers` layers hold their own tensors, and `--timed-layers` calls (cycling over
them) are timed per step and scaled to the model's layer count, so memory stays a few GB at 32K
and the default run a few minutes. Every (kernel, cache) of one configuration is timed in the same
rounds, interleaved; the best round is reported (`--stat median` for the median: on a machine
shared with other work the best round is the kernel's cost, the median mostly the neighbours').
With load, a second process decodes at the same time (the loop kernel, 8B-like shape at 16K,
compressed, batch 1) for the whole measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from kvstore.decode.kernels import AUTO, KERNELS, get_kernel
from kvstore.decode.prefix import RaggedPrefix

SHAPES = {"smollm2": (30, 3, 3, 64), "8b": (32, 8, 4, 128)}  # layers, KV heads, groups, head dim
SUFFIX = 24
NAMES = (*KERNELS, AUTO)  # every kernel, and what the default picks per call
KEPT = 0.25
K = TypeVar("K")


@dataclass
class Row:
    shape: str
    tokens: int
    batch: int
    load: str
    kernel: str
    full_ms: float
    compressed_ms: float
    floor_ms: float
    shared_floor_ms: float

    @property
    def vs_floor(self) -> float:
        return self.compressed_ms / self.floor_ms

    @property
    def vs_shared_floor(self) -> float:
        return self.compressed_ms / self.shared_floor_ms

    @property
    def full_over_compressed(self) -> float:
        return self.full_ms / self.compressed_ms


def uneven_lengths(kv_heads: int, tokens: int, gen: torch.Generator) -> list[int]:
    """Per-head kept lengths averaging KEPT of the context, each head between 0.25x and 1.75x of that."""
    weights = 0.25 + 1.5 * torch.rand(kv_heads, generator=gen)
    weights = weights / weights.mean()
    return [min(tokens, round(float(w) * KEPT * tokens)) for w in weights]


def prefix(lengths: list[int], dim: int, gen: torch.Generator) -> RaggedPrefix:
    rows = sum(lengths)
    return RaggedPrefix(torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen), tuple(lengths))


def shared_floor_step(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense attention with the batch folded into the query rows: each KV head's keys read once."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    folded = query.reshape(batch, kv_heads, -1, dim).transpose(0, 1).reshape(1, kv_heads, -1, dim)
    return F.scaled_dot_product_attention(folded, keys, values)


def interleaved(steps: dict[K, Callable[[], object]], rounds: int) -> dict[K, list[float]]:
    """Seconds per call of every step, after one warm-up each: round by round, every step once per round."""
    times: dict[K, list[float]] = {key: [] for key in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return times


def time_config(
    shape: str, tokens: int, batch: int, distinct: int, timed_layers: int, rounds: int, load: str, stat: str
) -> list[Row]:
    layers, kv_heads, groups, dim = SHAPES[shape]
    gen = torch.Generator().manual_seed(tokens + batch)
    held, timed = min(distinct, layers), min(timed_layers, layers)
    full = [prefix([tokens] * kv_heads, dim, gen) for _ in range(held)]
    compressed = [prefix(uneven_lengths(kv_heads, tokens, gen), dim, gen) for _ in range(held)]
    mean = round(sum(compressed[0].lengths) / kv_heads)
    shared = [torch.randn(1, kv_heads, mean + SUFFIX, dim, generator=gen) for _ in range(held)]
    dense = [rows.expand(batch, -1, -1, -1).contiguous() for rows in shared]  # one copy per question, as a cache
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=gen)
    suffix_k = torch.randn(batch, kv_heads, SUFFIX, dim, generator=gen)
    suffix_v = torch.randn(batch, kv_heads, SUFFIX, dim, generator=gen)
    scale = dim**-0.5

    def kernel_step(name: str, prefixes: list[RaggedPrefix]):
        kernel = get_kernel(name)
        return lambda: [kernel(query, prefixes[i % held], suffix_k, suffix_v, None, scale) for i in range(timed)]

    steps = {
        ("floor", "dense"): lambda: [
            F.scaled_dot_product_attention(query, dense[i % held], dense[i % held], enable_gqa=True)
            for i in range(timed)
        ],
        ("floor", "shared"): lambda: [
            shared_floor_step(query, shared[i % held], shared[i % held]) for i in range(timed)
        ],
    }
    for name in NAMES:
        steps[(name, "full")] = kernel_step(name, full)
        steps[(name, "compressed")] = kernel_step(name, compressed)
    times = interleaved(steps, rounds)
    pick = min if stat == "min" else statistics.median
    ms = {key: 1000 * pick(values) * layers / timed for key, values in times.items()}
    return [
        Row(
            shape,
            tokens,
            batch,
            load,
            name,
            ms[(name, "full")],
            ms[(name, "compressed")],
            ms[("floor", "dense")],
            ms[("floor", "shared")],
        )
        for name in NAMES
    ]


def contend() -> None:
    """The second decoding process: the 8B-like shape at 16K, compressed, batch 1, until killed or orphaned."""
    parent = os.getppid()
    gen = torch.Generator().manual_seed(0)
    layers, kv_heads, groups, dim = SHAPES["8b"]
    prefixes = [prefix(uneven_lengths(kv_heads, 16384, gen), dim, gen) for _ in range(4)]
    query = torch.randn(1, kv_heads * groups, 1, dim)
    suffix = torch.randn(1, kv_heads, SUFFIX, dim)
    print("ready", flush=True)
    while os.getppid() == parent:  # a killed benchmark leaves no process behind
        for i in range(layers):
            KERNELS["loop"](query, prefixes[i % 4], suffix, suffix, None, dim**-0.5)


@contextmanager
def contention(load: str) -> Iterator[None]:
    """With load "second-process", the `contend` process decodes for as long as the block runs."""
    if load != "second-process":
        yield
        return
    helper = subprocess.Popen([sys.executable, __file__, "--contend"], stdout=subprocess.PIPE, text=True)
    try:
        helper.stdout.readline()  # wait until it decodes
        yield
    finally:
        helper.kill()
        helper.wait()


def table(rows: list[Row]) -> str:
    lines = [
        "| shape | tokens | batch | load | kernel | full ms | compressed ms | dense floor ms | shared floor ms "
        "| compressed / dense floor | compressed / shared floor | full / compressed |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.tokens // 1024}K | {r.batch} | {r.load} | {r.kernel} | {r.full_ms:.1f} | "
            f"{r.compressed_ms:.1f} | {r.floor_ms:.1f} | {r.shared_floor_ms:.1f} | {r.vs_floor:.2f}x | "
            f"{r.vs_shared_floor:.2f}x | {r.full_over_compressed:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4K and 16K only, 3 rounds")
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths (default 4096,16384,32768)")
    parser.add_argument("--shapes", default="smollm2,8b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (default 5)")
    parser.add_argument("--distinct-layers", type=int, default=4)
    parser.add_argument("--stat", choices=["min", "median"], default="min", help="which round is reported")
    parser.add_argument("--timed-layers", type=int, default=8, help="layer calls timed per step, scaled up")
    parser.add_argument("--load", default="quiet,second-process", help="quiet, second-process, or both")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--contend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contend:
        contend()
        return
    lengths = [int(n) for n in (args.lengths or ("4096,16384" if args.quick else "4096,16384,32768")).split(",")]
    rounds = args.rounds or (3 if args.quick else 7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.stat} of {rounds} rounds")
    rows: list[Row] = []
    for load in args.load.split(","):
        with contention(load):
            for shape in args.shapes.split(","):
                for tokens in lengths:
                    for batch in (int(b) for b in args.batches.split(",")):
                        rows += time_config(
                            shape, tokens, batch, args.distinct_layers, args.timed_layers, rounds, load, args.stat
                        )
                        print(table(rows[-len(NAMES) :]).splitlines()[-len(NAMES) :], flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
