"""`kvstore ingest`: documents in, compressed contexts stored, with a progress bar and a summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.console import make_console
from cli.errors import EXIT_ERROR, EXIT_PARTIAL, fail
from cli.options import (
    check_model,
    compression_options,
    given_compression,
    quiet_transformers,
    store_options,
    with_settings,
)
from kvstore.config import Settings
from kvstore.text.documents import DocumentError, discover, read_document

if TYPE_CHECKING:
    from kvstore.client import KVStore
    from kvstore.presses.base import Press

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
@with_settings
def ingest(paths: tuple[str, ...], queue: bool, settings: Settings) -> None:
    """Compress and store documents: files or folders (recursive; .txt .md .rst .html).

    Documents longer than the model's window are split at paragraph boundaries into linked parts.
    A document already stored with the same settings is skipped without recomputation. Progress
    shows each document's stage (prefilling, scoring, writing), the tokens done and an ETA.
    Exit 1 when nothing could be stored, 5 when some documents failed and the others were stored.

    \b
    Examples:
        kvstore ingest docs/ notes.md --ratio 0.75 --quant int8
        kvstore ingest --queue docs/     # same, on the workers (kvstore submit + kvstore status --wait)
    """
    if queue:
        from cli.worker_cmds import submit_and_wait

        submit_and_wait(paths, given_compression(), settings)
        return
    check_model(settings)
    files = discover(paths)
    if not files:
        fail(f"no supported documents under {', '.join(paths)}")
    from kvstore.client import KVStore

    quiet_transformers()
    with KVStore(settings) as kv:
        compressor = kv.press()  # validates the press spec before the model loads
        summary = IngestSummary()
        texts = _read_all(files, summary, settings.max_document_bytes)  # bad files fail here, before model work
        if texts:
            console.print(f"loading model [bold]{kv.settings.model}[/]")
            kv.model()
            _ingest_all(kv, texts, compressor, summary)
    console.print(summary.table())
    console.print(f"{summary.tokens:,} context tokens; {summary.bytes_saved / 2**20:,.1f} MiB saved vs full caches")
    if summary.failed:
        raise SystemExit(EXIT_PARTIAL if summary.stored or summary.duplicates else EXIT_ERROR)


def _read_all(files: list[Path], summary: IngestSummary, max_bytes: int) -> dict[Path, str]:
    """Text of every readable file; the others are recorded as failed with the reason."""
    texts = {}
    for path in files:
        try:
            texts[path] = read_document(path, max_bytes)
        except DocumentError as exc:
            summary.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
    return texts


class PartProgress:
    """The second bar: the stage of the document part being worked on, tokens done, and an ETA."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.bar = progress.add_task("", total=None, visible=False, detail="")

    def __call__(self, stage: str, *, tokens: int, part: int, parts: int, done: int) -> None:
        of = f" part {part + 1}/{parts}" if parts > 1 else ""
        total = 1 if stage == "writing" else tokens
        if done == 0:  # a new stage: its own ETA
            self.progress.reset(self.bar, total=total, visible=True)
        detail = f"{min(done, total):,}/{total:,} tok" if stage != "writing" else ""
        self.progress.update(self.bar, description=f"  {stage}{of}", completed=min(done, total), detail=detail)

    def close(self) -> None:
        self.progress.remove_task(self.bar)


def _ingest_all(kv: KVStore, texts: dict[Path, str], compressor: Press, summary: IngestSummary) -> None:
    started = time.perf_counter()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("ingesting", total=len(texts), detail="")
        for path, text in texts.items():
            progress.update(task, description=f"ingesting {path.name}")
            stage = PartProgress(progress)
            try:
                parts = kv.ingest_text(text, str(path), compressor, report=stage)
            except DocumentError as exc:
                summary.failed.append((str(path), str(exc).removeprefix(f"{path}: ")))
            else:
                new = [p for p in parts if p.created]
                (summary.stored if new else summary.duplicates).append(path.name)
                summary.tokens += sum(p.record.original_length for p in new)
                summary.bytes_saved += sum(p.record.full_bytes - p.record.bytes for p in new)
            finally:
                stage.close()
            rate = summary.tokens / (time.perf_counter() - started)
            progress.update(task, advance=1, detail=f"{rate:,.0f} tok/s, saved {summary.bytes_saved / 2**20:,.1f} MiB")
