"""Commands over stored contexts: ls, show, ask, search, rm, gc, reindex, stats.

ls, show, search, rm, gc, reindex and stats read only the index (and blob headers for gc and
reindex): they import no torch and load no model. ask loads the model when it has something to answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from cli.console import make_console
from cli.options import (
    Finite,
    check_model,
    complete_context_ids,
    json_option,
    kernel_option,
    model_option,
    print_json,
    quiet_transformers,
    ref_argument,
    store_options,
    with_settings,
)
from kvstore.config import Settings

if TYPE_CHECKING:
    from kvstore.decode.answer import Source
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
    from kvstore.refs import incomplete_ids

    with open_store(settings) as store:
        records = store.list(limit)
        incomplete = incomplete_ids(store.list())
        unindexed = 0 if records else sum(1 for e in store.backend.list() if e.complete)
    if unindexed:  # on stderr: --json output stays a plain list
        click.echo(
            f"the index has no contexts, but {unindexed} blobs are stored: if the index was lost, "
            "rebuild it from them with `kvstore reindex`",
            err=True,
        )
    if as_json:
        print_json([{**asdict(r), "incomplete": r.id in incomplete} for r in records])
        return
    table = Table(title=f"{len(records)} contexts")
    for column in ("id", "source", "part", "tokens", "press", "removed", "quant", "size", "created"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            r.id[:12],
            _short(r.source) or "-",
            f"{r.part + 1}/{r.parts}" + (" [red]incomplete[/]" if r.id in incomplete else ""),
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


def _cited(sources: Sequence[Source]) -> str:
    """The contexts an answer came from, for people: document, part, and BM25 score when retrieved."""
    return "; ".join(
        escape(s.source or s.id[:12])
        + (f" part {s.part + 1}/{s.parts}" if s.parts > 1 else "")
        + (f" (bm25 {s.score:.2f})" if s.score is not None else "")
        for s in sources
    )


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="[REF] QUESTION...")
@click.option(
    "--context",
    "-c",
    "more",
    multiple=True,
    metavar="REF",
    shell_complete=complete_context_ids,
    help="Another stored context to compose after REF (repeatable): one answer from all of them.",
)
@click.option(
    "--retrieve",
    "-k",
    type=click.IntRange(1, 64),
    default=None,
    metavar="K",
    help="No REF: search the store (BM25) and answer from the top K contexts that fit, composed best match last.",
)
@click.option(
    "--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096), help="Longest answer, in tokens."
)
@click.option("--temperature", default=0.0, show_default=True, type=Finite(0.0), help="0 = greedy.")
@click.option("--stop", multiple=True, help="End the answer before this string (repeatable).")
@json_option
@model_option
@kernel_option
@store_options
@with_settings
def ask(
    args: tuple[str, ...],
    more: tuple[str, ...],
    retrieve: int | None,
    max_new_tokens: int,
    temperature: float,
    stop: tuple[str, ...],
    as_json: bool,
    settings: Settings,
) -> None:
    """Answer questions from stored contexts, without prefilling any document again.

    REF is an id, a unique id prefix, or the path of an ingested document. Several contexts
    (-c REF ...) are composed into one prompt and answered once; a document stored in several
    parts is composed too, keeping the parts most relevant to the question when they do not all
    fit the window. With --retrieve K there is no REF: the store is searched first. One question
    streams its answer; several are decoded as one batch. The contexts used are printed (documents,
    parts, and BM25 scores when retrieved).

    \b
    Examples:
        kvstore ask docs/lighthouse.md "What color is the door?" "How tall is it?"
        kvstore ask report-part1.md -c report-part2.md "Who signed the report?"
        kvstore ask --retrieve 4 "Which city hosts the archive?"
    """
    refs, questions = ([], list(args)) if retrieve else ([args[0], *more], list(args[1:]))
    if not questions:
        raise click.UsageError("give at least one question after REF (or use --retrieve K)")
    if any(not q.strip() for q in questions) or any(not r.strip() for r in refs):
        raise click.UsageError("empty question or context reference")
    check_model(settings)
    from kvstore.client import KVStore
    from kvstore.decode.generation import GenerationOptions

    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop)
    quiet_transformers()
    with KVStore(settings) as kv:
        if retrieve:
            answers = [kv.retrieve_and_ask(q, retrieve, options) for q in questions]
        elif len(questions) == 1 and not as_json:
            context = kv.prepare(refs, questions, options)
            console.print(f"[dim]{_cited(context.sources)}[/]")
            for piece in context.stream(questions[0], options):
                console.out(piece, end="", highlight=False)
            console.out("")
            return
        else:
            answers = kv.ask_many(refs, questions, options)
        if as_json:
            print_json([_reply(q, a.to_dict()) for q, a in zip(questions, answers, strict=True)])
            return
        for question, answer in zip(questions, answers, strict=True):
            console.print(f"[dim]{_cited(answer.sources)}[/] [bold]{escape(question)}[/]")
            console.out(answer, highlight=False)


def _reply(question: str, answer: dict[str, Any]) -> dict[str, Any]:
    """One --json entry: the question, then the answer's fields (`Answer.to_dict`, its text as "answer")."""
    return {"question": question, "answer": answer.pop("text"), **answer}


@click.command()
@click.argument("question")
@click.option("--limit", "-n", default=5, show_default=True, type=click.IntRange(1, 1000), help="Contexts to list.")
@json_option
@store_options
@with_settings
def search(question: str, limit: int, as_json: bool, settings: Settings) -> None:
    """List the stored contexts (document parts included) that best match a question (BM25).

    Reads the stored texts from the index only: no blob, no model.

    \b
    Example:
        kvstore search "Which city hosts the archive?" -n 4
    """
    from kvstore.search import ContextSearch

    with open_store(settings) as store:
        hits = ContextSearch(store).search(question, limit, where=lambda r: r.model == settings.model)
    if as_json:
        print_json([h.to_dict() for h in hits])
        return
    table = Table(title=f"{len(hits)} contexts for {question!r}")
    for column in ("id", "source", "part", "score"):
        table.add_column(column, overflow="fold")
    for h in hits:
        table.add_row(h.id[:12], _short(h.source) or "-", f"{h.part + 1}/{h.parts}", f"{h.score:.2f}")
    console.print(table)


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
    type=Finite(0.0),
    help="Leave leftovers younger than this many seconds (live writers are protected by a lease anyway).",
)
@click.option(
    "--orphans",
    is_flag=True,
    help="Also delete valid blobs without a record that do not name this index (older stores); needs --yes.",
)
@click.option("--yes", is_flag=True, help="Confirm --orphans.")
@store_options
@with_settings
def gc(grace: float, orphans: bool, yes: bool, settings: Settings) -> None:
    """Remove orphan blobs, interrupted writes, damaged blobs, and records whose blob is gone.

    A valid blob is deleted only when it names this store's index and that index has no record of
    it; others are listed as kept (`kvstore reindex` indexes them, `--orphans --yes` deletes them).
    Blobs a writer is working on are never touched.

    \b
    Example:
        kvstore gc
        kvstore gc --orphans --yes
    """
    from kvstore.storage.maintenance import gc as collect

    if orphans and not yes:
        raise click.UsageError("--orphans deletes blobs no record points to: confirm with --yes")
    with open_store(settings) as store:
        report = collect(store, grace_s=grace, orphans=orphans)
    for line in report.kept:
        console.print(f"[dim]kept {line}[/]", highlight=False)
    for name in report.links:
        console.print(f"unlinked {name}: a symbolic link where a blob belongs (its target was not touched)")
    console.print(
        f"orphan blobs: {len(report.orphan_blobs)}, temp files: {len(report.temp_files)}, "
        f"damaged blobs: {len(report.damaged_blobs)}, stale records: {len(report.stale_records)}, "
        f"orphan texts: {len(report.orphan_texts)}, kept: {len(report.kept)}, freed {_size(report.freed_bytes)}"
    )


@click.command()
@store_options
@with_settings
def reindex(settings: Settings) -> None:
    """Rebuild lost index records from the blobs' headers (after a Redis was lost or restarted empty).

    Each blob must prove it is its id's content; texts for `search` are not in blobs, so reindexed
    contexts answer questions but are found by search only after they are ingested again.

    \b
    Example:
        KVSTORE_REDIS_URL=redis://host:6379/0 kvstore reindex
    """
    from kvstore.storage.maintenance import reindex as rebuild
    from kvstore.storage.store import ContextStore

    with ContextStore.open(settings, adopt=True) as store:
        report = rebuild(store)
    for line in report.skipped:
        console.print(f"[dim]skipped {line}[/]", highlight=False)
    console.print(f"added {len(report.added)} records, {report.present} already indexed, {len(report.skipped)} skipped")


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
