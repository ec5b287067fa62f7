"""`kvstore bench`: what each stage costs as contexts grow, on this machine and model."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from cli.console import make_console
from cli.eval_cmd import check_specs, parse_numbers
from cli.options import (
    Finite,
    check_model,
    haystack_option,
    kernel_option,
    model_option,
    quiet_transformers,
    with_settings,
)
from kvstore.config import QUANT_BITS, Settings

if TYPE_CHECKING:
    import torch

    from kvstore.eval.perf import PerfRow, ThroughputRow

console = make_console()
THROUGHPUT_QUESTIONS = [
    "What is the main point?",
    "Who is mentioned first?",
    "What happens at the end?",
    "Name one place in the text.",
    "What is the tone of the text?",
]


@click.command("bench")
@model_option
@kernel_option
@click.option("--press", default="kvzip", show_default=True, help="Press spec, e.g. kvzip+think:0.25.")
@click.option("--ratio", default=0.75, show_default=True, type=Finite(0.0, 1.0, max_open=True))
@click.option("--quant", default="none", show_default=True, type=click.Choice(sorted(QUANT_BITS)))
@click.option(
    "--lengths",
    default="500,1000,2000,4000",
    show_default=True,
    callback=parse_numbers,
    help="Comma-separated context lengths in tokens.",
)
@click.option(
    "--questions",
    "batch_sizes",
    default="1,8,32",
    show_default=True,
    callback=parse_numbers,
    help="ask_many batch sizes for the throughput table (against the first length's context).",
)
@haystack_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where bench.json and bench.png go (default results/bench-<time>).",
)
@with_settings
def bench(
    press: str,
    ratio: float,
    quant: str,
    lengths: list[float],
    batch_sizes: list[float],
    haystack: str | None,
    out: str | None,
    settings: Settings,
) -> None:
    """Measure prefill, scoring, write, load, time to first token and decode speed per context length.

    Time to first token compares loading the stored compressed context against prefilling the
    whole document again. Runs a short warm-up first so one-time costs stay out of the figures.

    \b
    Example:
        kvstore bench --lengths 1000,4000 --questions 1,8,32 --kernel loop
    """
    check_model(settings)
    check_specs([press])
    from kvstore.decode.cache import CompressedCache
    from kvstore.engine.models import load_model
    from kvstore.eval.haystack import filler, tokenizer_counter
    from kvstore.eval.perf import measure_length, measure_throughput
    from kvstore.storage.store import ContextStore

    quiet_transformers()
    loaded = load_model(settings.model, settings)
    count = tokenizer_counter(loaded.tokenizer)
    out_dir = Path(out or f"results/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    with (
        tempfile.TemporaryDirectory(prefix="kvstore-bench-") as home,
        ContextStore.open(Settings(home=Path(home), redis_url=None)) as store,
    ):
        kernel = settings.kernel
        measure_length(loaded, store, filler(200, haystack, 99, count), press, ratio, quant, kernel, decode_tokens=4)
        rows = []
        for length in lengths:
            console.print(f"measuring {int(length):,} tokens ...")
            rows.append(
                measure_length(
                    loaded, store, filler(int(length), haystack, int(length), count), press, ratio, quant, kernel
                )
            )
        first = store.list()[-2]  # the first measured length (newest first; the warm-up is last)
        cache = CompressedCache.from_store(store, first.id, loaded, kernel)
        throughput = measure_throughput(loaded, cache, THROUGHPUT_QUESTIONS, [int(b) for b in batch_sizes])
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch_device_name(loaded.device)
    (out_dir / "bench.json").write_text(
        json.dumps(
            {
                "device": device,
                "model": loaded.name,
                "press": press,
                "ratio": ratio,
                "quant": quant,
                "kernel": cache.kernel,
                "lengths": [r.to_dict() for r in rows],
                "ask_many": [asdict(t) for t in throughput],
            },
            indent=1,
        )
    )
    _plot(rows, out_dir / "bench.png", device)
    console.print(_length_table(rows, device))
    console.print(_throughput_table(throughput, first.original_length))
    console.print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.png'}")


def torch_device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def _length_table(rows: list[PerfRow], device: str) -> Table:
    table = Table(title=f"cost per context length on {device}")
    columns = [
        "tokens",
        "prefill s",
        "score s",
        "write s",
        "blob MiB",
        "full MiB",
        "load s",
        "TTFT stored s",
        "TTFT re-prefill s",
        "speed-up",
        "decode tok/s full",
        "decode tok/s compressed",
    ]
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r.context_tokens:,}",
            f"{r.prefill_s:.2f}",
            f"{r.score_s:.2f}",
            f"{r.write_s:.3f}",
            f"{r.blob_bytes / 2**20:.1f}",
            f"{r.full_kv_bytes / 2**20:.1f}",
            f"{r.load_s:.3f}",
            f"{r.ttft_stored_s:.3f}",
            f"{r.ttft_reprefill_s:.2f}",
            f"{r.ttft_reprefill_s / r.ttft_stored_s:.1f}x",
            f"{r.decode_tps_full:.1f}",
            f"{r.decode_tps_compressed:.1f}",
        )
    return table


def _throughput_table(rows: list[ThroughputRow], tokens: int) -> Table:
    table = Table(title=f"ask_many against one stored {tokens:,}-token context")
    for column in ("questions", "seconds", "questions/s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r.questions), f"{r.seconds:.2f}", f"{r.questions_per_s:.2f}")
    return table


def _plot(rows: list[PerfRow], path: Path, device: str) -> None:
    from kvstore.errors import import_extra

    matplotlib = import_extra("matplotlib", "eval")

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = [r.context_tokens for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in [
        ("prefill", [r.prefill_s for r in rows]),
        ("KVzip scoring", [r.score_s for r in rows]),
        ("TTFT re-prefill", [r.ttft_reprefill_s for r in rows]),
        ("TTFT stored", [r.ttft_stored_s for r in rows]),
        ("load", [r.load_s for r in rows]),
    ]:
        ax.plot(x, values, marker="o", label=label)
    ax.set(xlabel="context tokens", ylabel="seconds", yscale="log", title=f"cost vs context length ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
