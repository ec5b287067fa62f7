"""Commands over stored contexts: ls, show, ask, rm, gc, stats."""

from __future__ import annotations

import datetime as dt

import click
from rich.table import Table

from cli.console import make_console
from cli.options import open_client, store_options
from kvstore.storage.index import ContextRecord

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


@click.command("ls")
@click.option("--limit", "-n", default=50, show_default=True, help="Show at most this many contexts.")
@store_options
def list_contexts(limit: int, home: str | None, redis_url: str | None) -> None:
    """List stored contexts, newest first.

    \b
    Example:
        kvstore ls -n 20
    """
    with open_client(home, redis_url=redis_url) as kv:
        records = kv.store.list(limit)
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
@click.argument("ref")
@store_options
def show(ref: str, home: str | None, redis_url: str | None) -> None:
    """Show everything about one context: metadata, sizes, compression achieved.

    REF is an id, a unique id prefix, or the path of an ingested document.

    \b
    Example:
        kvstore show 3f2a9c1b
    """
    with open_client(home, redis_url=redis_url) as kv:
        records = kv.resolve(ref)
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
@click.argument("ref")
@click.argument("questions", nargs=-1, required=True)
@click.option("--max-new-tokens", default=64, show_default=True, help="Longest answer, in tokens.")
@store_options
def ask(ref: str, questions: tuple[str, ...], max_new_tokens: int, home: str | None, redis_url: str | None) -> None:
    """Answer questions from a stored context, without prefilling the document again.

    REF is an id, a unique id prefix, or the path of an ingested document (every part of a
    split document is asked). One question streams its answer; several are decoded as one batch.

    \b
    Example:
        kvstore ask docs/lighthouse.md "What color is the door?" "How tall is it?"
    """
    with open_client(home, redis_url=redis_url) as kv:
        contexts = kv.contexts(ref)
        for context in contexts:
            label = f"[dim]{context.record.source or context.record.id[:12]}"
            label += f" part {context.record.part + 1}/{context.record.parts}[/]" if len(contexts) > 1 else "[/]"
            if len(questions) == 1:
                console.print(label)
                for piece in context.stream(questions[0], max_new_tokens):
                    console.out(piece, end="", highlight=False)
                console.out("")
                continue
            for question, answer in zip(questions, context.ask_many(list(questions), max_new_tokens), strict=True):
                console.print(f"{label} [bold]{question}[/]")
                console.out(answer, highlight=False)


@click.command("rm")
@click.argument("refs", nargs=-1, required=True)
@store_options
def remove(refs: tuple[str, ...], home: str | None, redis_url: str | None) -> None:
    """Delete stored contexts (record first, then blob).

    \b
    Example:
        kvstore rm 3f2a9c1b docs/old.md
    """
    with open_client(home, redis_url=redis_url) as kv:
        records = [record for ref in refs for record in kv.resolve(ref)]
        for record in records:
            kv.store.delete(record.id)
            console.print(f"removed {record.id[:12]} ({record.source or '-'})")


@click.command()
@click.option(
    "--grace",
    default=600.0,
    show_default=True,
    help="Leave blobs younger than this many seconds (a write may still be committing).",
)
@store_options
def gc(grace: float, home: str | None, redis_url: str | None) -> None:
    """Remove orphan blobs, interrupted writes, and records whose blob is gone.

    \b
    Example:
        kvstore gc --grace 0
    """
    with open_client(home, redis_url=redis_url) as kv:
        report = kv.store.gc(grace_s=grace)
    console.print(
        f"orphan blobs: {len(report.orphan_blobs)}, temp files: {len(report.temp_files)}, "
        f"stale records: {len(report.stale_records)}, freed {_size(report.freed_bytes)}"
    )


@click.command()
@store_options
def stats(home: str | None, redis_url: str | None) -> None:
    """Totals: contexts, tokens, bytes stored and bytes saved versus full caches.

    \b
    Example:
        kvstore stats
    """
    with open_client(home, redis_url=redis_url) as kv:
        totals = kv.store.stats()
    console.print(
        f"contexts: {totals.contexts:,}\ncontext tokens: {totals.context_tokens:,}\n"
        f"stored: {_size(totals.stored_bytes)}\nfull caches would take: {_size(totals.full_bytes)}\n"
        f"saved: {_size(totals.full_bytes - totals.stored_bytes)} ({totals.saving:.1%})"
    )
