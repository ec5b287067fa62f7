"""`kvstore ingest`: documents in, compressed contexts stored, with a progress bar and a summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import make_console
from cli.options import compression_options, open_client, store_options
from kvstore.client import KVStore
from kvstore.presses.base import Press
from kvstore.text.documents import DocumentError, discover, read_document

console = make_console(stderr=True)


@dataclass
class IngestSummary:
    stored: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    bytes_saved: int = 0

    def table(self) -> Table:
        table = Table(title="ingest summary")
        for column in ("outcome", "documents", "details"):
            table.add_column(column)
        table.add_row(
            "stored", str(len(self.stored)), ", ".join(self.stored[:5]) + (" ..." if len(self.stored) > 5 else "")
        )
        table.add_row("skipped (duplicates)", str(len(self.duplicates)), ", ".join(self.duplicates[:5]))
        table.add_row(
            "failed",
            str(len(self.failed)),
            "\n".join(f"{p}: {why}" for p, why in self.failed),
            style="red" if self.failed else None,
        )
        return table


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--queue", is_flag=True, help="Run on the workers (`kvstore worker`): submit, then follow the job.")
@compression_options
@store_options
def ingest(
    paths: tuple[str, ...],
    queue: bool,
    home: str | None,
    redis_url: str | None,
    model: str | None,
    press: str | None,
    ratio: float | None,
    quant: str | None,
    blob_format: str | None,
) -> None:
    """Compress and store documents: files or folders (recursive; .txt .md .rst .html).

    Documents longer than the model's window are split at paragraph boundaries into linked parts.
    A document already stored with the same settings is skipped without recomputation.

    \b
    Examples:
        kvstore ingest docs/ notes.md --ratio 0.75 --quant int8
        kvstore ingest --queue docs/     # same, on the workers (kvstore submit + kvstore status --wait)
    """
    if queue:
        from cli.worker_cmds import submit_and_wait

        overrides = {"model": model, "press": press, "ratio": ratio, "quant": quant, "blob_format": blob_format}
        submit_and_wait(paths, overrides, home, redis_url)
        return
    files = discover(paths)
    if not files:
        raise click.ClickException(f"no supported documents under {', '.join(paths)}")
    kv = open_client(
        home, redis_url=redis_url, model=model, press=press, ratio=ratio, quant=quant, blob_format=blob_format
    )
    with kv:
        compressor = kv.press()  # validates press and ratio before the model loads
        summary = IngestSummary()
        texts = _read_all(files, summary)  # bad files fail here, before any model work
        if texts:
            console.print(f"loading model [bold]{kv.settings.model}[/]")
            kv.model()
            _ingest_all(kv, texts, compressor, summary)
    console.print(summary.table())
    console.print(f"{summary.tokens:,} context tokens; {summary.bytes_saved / 2**20:,.1f} MiB saved vs full caches")
    if summary.failed:
        raise SystemExit(1)


def _read_all(files: list[Path], summary: IngestSummary) -> dict[Path, str]:
    """Text of every readable file; the others are recorded as failed with the reason."""
    texts = {}
    for path in files:
        try:
            texts[path] = read_document(path)
        except DocumentError as exc:
            summary.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
    return texts


def _ingest_all(kv: KVStore, texts: dict[Path, str], compressor: Press, summary: IngestSummary) -> None:
    started = time.perf_counter()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.0f} tok/s"),
        TextColumn("saved {task.fields[saved]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("ingesting", total=len(texts), rate=0.0, saved="0 B")
        for path, text in texts.items():
            progress.update(task, description=f"ingesting {path.name}")
            try:
                parts = kv.ingest_text(text, str(path), compressor)
            except DocumentError as exc:
                summary.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
            else:
                new = [p for p in parts if p.created]
                (summary.stored if new else summary.duplicates).append(path.name)
                summary.tokens += sum(p.record.original_length for p in new)
                summary.bytes_saved += sum(p.record.full_bytes - p.record.bytes for p in new)
            progress.update(
                task,
                advance=1,
                rate=summary.tokens / (time.perf_counter() - started),
                saved=f"{summary.bytes_saved / 2**20:,.1f} MiB",
            )
