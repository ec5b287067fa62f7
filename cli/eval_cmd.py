"""`kvstore eval`: accuracy vs compression ratio on synthetic RULER-style tasks, for your model."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import make_console
from cli.options import Finite, check_model, haystack_option, model_option, quiet_transformers, with_settings
from kvstore.config import QUANT_BITS, Settings
from kvstore.eval.tasks import TASKS, make_suite

if TYPE_CHECKING:
    from kvstore.eval.runner import CaseResult

console = make_console()


def parse_numbers(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not numbers or any(not math.isfinite(n) for n in numbers):
        raise click.BadParameter(f"expected comma-separated finite numbers, got {value!r}")
    if param.name == "ratios":
        if any(not 0.0 <= r < 1.0 for r in numbers):
            raise click.BadParameter("ratios must be in [0, 1)")
    elif any(n < 1 for n in numbers):
        raise click.BadParameter(f"expected counts of at least 1, got {value!r}")
    return numbers


def split_specs(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """Comma-separated press specs, checked by `check_specs` once the command runs."""
    return [v.strip() for v in value.split(",") if v.strip()]


def check_specs(specs: list[str], option: str = "--press") -> None:
    """Each press spec, checked by building it once; imports torch, so it runs after `check_model`."""
    from kvstore.presses import parse_press_spec

    for spec in specs:
        try:
            parse_press_spec(spec, 0.5)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _names(choices: list[str]) -> Callable[[click.Context, click.Parameter, str], list[str]]:
    """A click callback accepting a comma-separated subset of `choices`."""

    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return names

    return parse


@click.command("eval")
@model_option
@click.option(
    "--press",
    "presses",
    default="kvzip,streaming",
    show_default=True,
    callback=split_specs,
    help="Comma-separated press specs; stages without a ratio take the swept one "
    "(e.g. kvzip,kvzip+think:0.25; kvzip@global compares another budget).",
)
@click.option(
    "--ratio",
    "ratios",
    default="0.5,0.75,0.9",
    show_default=True,
    callback=parse_numbers,
    help="Comma-separated compression ratios (fraction of KV pairs removed).",
)
@click.option(
    "--tasks", default=",".join(TASKS), show_default=True, callback=_names(list(TASKS)), help="Comma-separated tasks."
)
@click.option("--n", "n", default=10, show_default=True, type=click.IntRange(1), help="Samples per task.")
@click.option(
    "--context-tokens",
    default="1000,2000",
    show_default=True,
    callback=parse_numbers,
    help="Comma-separated context lengths in tokens.",
)
@haystack_option
@click.option("--quant", default="none", show_default=True, type=click.Choice(sorted(QUANT_BITS)))
@click.option("--seed", default=0, show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option(
    "--blend",
    "blend_fraction",
    default=0.0,
    show_default=True,
    type=Finite(0.0, 1.0),
    help="Multi-document tasks: also answer from compositions whose later segments had this fraction of "
    "their kept tokens recomputed against the composed prefix (CacheBlend); 0 = off.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where results.json, summary.csv and plots go (default results/eval-<time>).",
)
@with_settings
def evaluate_command(
    presses: list[str],
    ratios: list[float],
    tasks: list[str],
    n: int,
    context_tokens: list[float],
    haystack: str | None,
    quant: str,
    seed: int,
    max_new_tokens: int,
    blend_fraction: float,
    out: str | None,
    settings: Settings,
) -> None:
    """Measure accuracy vs compression ratio on synthetic tasks, question-agnostic.

    Every context is compressed, stored and loaded back before its question is asked. The full
    cache is always measured as the reference. Multi-document tasks (multidoc_needle, two_hop,
    long_document) are answered from the joint prefill of their documents ("kvzip"), from the
    documents stored apart and composed ("kvzip composed", "kvzip blended" with --blend), and from
    the best single document by BM25 ("kvzip single"); --context-tokens is their joint length.
    Writes results.json, summary.csv and one PNG per task family.

    \b
    Example:
        kvstore eval --press kvzip,streaming --ratio 0.5,0.75,0.9 --tasks niah_single --n 20 \\
            --context-tokens 1500 --haystack ../shared/data/haystack
    """
    check_model(settings)
    check_specs(presses)
    from kvstore.engine.models import load_model
    from kvstore.eval.haystack import tokenizer_counter
    from kvstore.eval.report import plot_accuracy, write_results
    from kvstore.eval.runner import evaluate
    from kvstore.storage.store import ContextStore

    quiet_transformers()
    loaded = load_model(settings.model, settings)
    count = tokenizer_counter(loaded.tokenizer)
    samples = [s for length in context_tokens for s in make_suite(tasks, n, int(length), seed, haystack, count)]
    out_dir = Path(out or f"results/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_ratio = [1 + (3 + (blend_fraction > 0) if s.documents or s.meta.get("parts") else 0) for s in samples]
    runs = sum(n * (1 + len(presses) * len([r for r in ratios if r > 0])) for n in per_ratio)
    with (
        tempfile.TemporaryDirectory(prefix="kvstore-eval-") as home,
        ContextStore.open(Settings(home=Path(home), redis_url=None)) as store,
        (out_dir / "results.jsonl").open("w") as log,
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        bar = progress.add_task("evaluating", total=runs)

        def record(result: CaseResult) -> None:
            """Keep every case on disk as it finishes: long sweeps can be followed and are never lost."""
            log.write(json.dumps(result.to_dict()) + "\n")
            log.flush()
            progress.update(bar, advance=1, description=f"{result.task} {result.method}")

        results = evaluate(
            loaded,
            samples,
            presses,
            ratios,
            store,
            quant,
            max_new_tokens,
            on_result=record,
            blend_fraction=blend_fraction,
        )
    files = write_results(results, out_dir) + plot_accuracy(results, out_dir)
    console.print(_table(results))
    console.print("wrote " + ", ".join(str(f) for f in files))


def _table(results: list[CaseResult]) -> Table:
    from kvstore.eval.report import summarize

    table = Table(title="accuracy by task")
    for column in ("task", "method", "ratio", "accuracy", "cases", "removed", "bytes/token", "score/prefill"):
        table.add_column(column)
    for row in summarize(results):
        table.add_row(
            row.group,
            row.method,
            f"{row.ratio:.2f}",
            f"{row.accuracy:.2f}",
            str(row.cases),
            f"{row.achieved_ratio:.1%}",
            f"{row.bytes_per_token:,.0f}",
            f"{row.score_over_prefill:.2f}x" if row.score_over_prefill else "-",
        )
    return table


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Where the merged files go.")
def report_command(results: tuple[str, ...], out: str) -> None:
    """Rebuild the table, results.json, summary.csv and plots from results.jsonl files of eval runs.

    Merges sweeps split across processes or machines, and finishes the report of an interrupted run.

    \b
    Example:
        kvstore report results/run-a/results.jsonl results/run-b/results.jsonl --out results/merged
    """
    from kvstore.eval.report import plot_accuracy, write_results
    from kvstore.eval.runner import CaseResult

    cases = [CaseResult(**json.loads(line)) for path in results for line in Path(path).read_text().splitlines() if line]
    files = write_results(cases, Path(out)) + plot_accuracy(cases, Path(out))
    console.print(_table(cases))
    console.print("wrote " + ", ".join(str(f) for f in files))
