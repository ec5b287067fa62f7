"""Commands over stored contexts: ls, show, ask, rm, gc, stats.

ls, show, rm, gc and stats read only the index (and blob files for gc): they import no torch and
load no model. ask loads the model when it has something to answer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import TYPE_CHECKING

import click
from rich.table import Table

from cli.console import make_console
from cli.options import json_option, model_option, print_json, ref_argument, store_options, with_settings
from kvstore.config import Settings

if TYPE_CHECKING:
    from kvstore.storage.index import ContextRecord
    from kvstore.storage.store import ContextStore

console = make_console()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _short(source: str, width: int = 40) -> str:
    """Keep the end of long paths: the file name is what people recognise."""
    return source if len(source) <= width else "…" + source[-(width - 1) :]


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def open_store(settings: Settings) -> ContextStore:
    from kvstore.storage.store import ContextStore

    return ContextStore.open(settings)


@click.command("ls")
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1), help="Show at most this many.")
@json_option
@store_options
@with_settings
def list_contexts(limit: int, as_json: bool, settings: Settings) -> None:
    """List stored contexts, newest first.

    \b
    Example:
        kvstore ls -n 20
        kvstore ls --json | jq '.[].id'
    """
    with open_store(settings) as store:
        records = store.list(limit)
    if as_json:
        print_json([asdict(r) for r in records])
        return
    table = Table(title=f"{len(records)} contexts")
    for column in ("id", "source", "part", "tokens", "press", "removed", "quant", "size", "created"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            r.id[:12],
            _short(r.source) or "-",
            f"{r.part + 1}/{r.parts}",
            f"{r.original_length:,}",
            r.press.get("press", "?"),
            f"{r.ratio_achieved:.0%}",
            r.quant,
            _size(r.bytes),
            _when(r.created),
        )
    console.print(table)


@click.command()
@ref_argument()
@json_option
@store_options
@with_settings
def show(ref: str, as_json: bool, settings: Settings) -> None:
    """Show everything about one context: metadata, sizes, compression achieved.

    REF is an id, a unique id prefix, or the path of an ingested document (every part is shown).
    Reads only the index: no model is loaded.

    \b
    Example:
        kvstore show 3f2a9c1b
        kvstore show docs/report.md --json
    """
    from kvstore.refs import resolve, stored_under

    with open_store(settings) as store:
        records = resolve(store, ref, stored_under(settings))
    if as_json:
        print_json([asdict(r) for r in records])
        return
    for record in records:
        console.print(_record_table(record))


def _record_table(r: ContextRecord) -> Table:
    table = Table(title=f"context {r.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = {
        "source": r.source or "-",
        "document": f"{r.document_sha256[:16]} (part {r.part + 1} of {r.parts})",
        "model": f"{r.model} (weights {r.model_fingerprint}, tokenizer {r.tokenizer_fingerprint})",
        "press": ", ".join(f"{k}={v}" for k, v in r.press.items()),
        "tokens": f"{r.original_length:,} context tokens ({r.prefix_length} template tokens never evicted)",
        "kv pairs": f"{r.kept_pairs:,} kept of {r.total_pairs:,}",
        "removed": f"{r.ratio_achieved:.1%} achieved ({r.ratio_requested:.0%} of the document requested)",
        "storage": f"{r.blob_format}, quant {r.quant}, dtype {r.dtype}",
        "size": f"{_size(r.bytes)} on disk vs {_size(r.full_bytes)} full "
        f"({r.full_bytes / max(1, r.bytes):.1f}x smaller)",
        "blob": r.blob,
        "checksum": r.checksum,
        "created": _when(r.created),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table


@click.command()
@ref_argument()
@click.argument("questions", nargs=-1, required=True)
@click.option(
    "--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096), help="Longest answer, in tokens."
)
@model_option
@store_options
@with_settings
def ask(ref: str, questions: tuple[str, ...], max_new_tokens: int, settings: Settings) -> None:
    """Answer questions from a stored context, without prefilling the document again.

    REF is an id, a unique id prefix, or the path of an ingested document (every part of a
    split document is asked). One question streams its answer; several are decoded as one batch.

    \b
    Example:
        kvstore ask docs/lighthouse.md "What color is the door?" "How tall is it?"
    """
    from cli.options import quiet_transformers
    from kvstore.client import KVStore

    quiet_transformers()
    with KVStore(settings) as kv:
        contexts = kv.contexts(ref)
        for context in contexts:
            label = f"[dim]{context.record.source or context.record.id[:12]}"
            label += f" part {context.record.part + 1}/{context.record.parts}[/]" if len(contexts) > 1 else "[/]"
            if len(questions) == 1:
                console.print(label)
                for piece in context.stream(questions[0], max_new_tokens=max_new_tokens):
                    console.out(piece, end="", highlight=False)
                console.out("")
                continue
            answers = context.ask_many(list(questions), max_new_tokens=max_new_tokens)
            for question, answer in zip(questions, answers, strict=True):
                console.print(f"{label} [bold]{question}[/]")
                console.out(answer, highlight=False)


@click.command("rm")
@ref_argument("refs", nargs=-1, required=True)
@store_options
@with_settings
def remove(refs: tuple[str, ...], settings: Settings) -> None:
    """Delete stored contexts (record first, then blob).

    \b
    Example:
        kvstore rm 3f2a9c1b docs/old.md
    """
    from kvstore.refs import resolve, stored_under

    with open_store(settings) as store:
        records = [record for ref in refs for record in resolve(store, ref, stored_under(settings))]
        for record in records:
            store.delete(record.id)
            console.print(f"removed {record.id[:12]} ({record.source or '-'})")


@click.command()
@click.option(
    "--grace",
    default=600.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="Leave blobs younger than this many seconds (a write may still be committing).",
)
@store_options
@with_settings
def gc(grace: float, settings: Settings) -> None:
    """Remove orphan blobs, interrupted writes, and records whose blob is gone.

    \b
    Example:
        kvstore gc
    """
    with open_store(settings) as store:
        report = store.gc(grace_s=grace)
    console.print(
        f"orphan blobs: {len(report.orphan_blobs)}, temp files: {len(report.temp_files)}, "
        f"stale records: {len(report.stale_records)}, freed {_size(report.freed_bytes)}"
    )


@click.command()
@json_option
@store_options
@with_settings
def stats(as_json: bool, settings: Settings) -> None:
    """Totals: contexts, tokens, bytes stored and bytes saved versus full caches.

    \b
    Example:
        kvstore stats
    """
    with open_store(settings) as store:
        totals = store.stats()
    if as_json:
        print_json({**asdict(totals), "saving": totals.saving})
        return
    console.print(
        f"contexts: {totals.contexts:,}\ncontext tokens: {totals.context_tokens:,}\n"
        f"stored: {_size(totals.stored_bytes)}\nfull caches would take: {_size(totals.full_bytes)}\n"
        f"saved: {_size(totals.full_bytes - totals.stored_bytes)} ({totals.saving:.1%})"
    )
