"""Keeping a store consistent: gc (remove what no record needs) and reindex (records back from blobs).

gc never guesses with live data. It runs only on a store whose blobs and index share an identity
(checked when the store opened), takes an id's writers' lease before it removes anything of that
id (so never a blob or temp file a live writer holds, however young), and deletes a blob with a
valid header only when the blob names this index as its owner and this index has no record of it
(or when asked to: `orphans=True`, `kvstore gc --orphans --yes`). Damaged blobs, temp files and
interrupted puts go once they are older than the grace period and no writer holds them. Search
texts without a record (left by an ingest that failed or died between its text and its record) go
under the text's own lease, which a writer holds from the text's write until its record commits
(`kvstore.storage.texts`): Redis keeps no age for a key, so the lease alone protects an ingest in
progress.

reindex rebuilds lost records from the blobs' headers and record info; each blob must prove it is
its name's content (the id recomputed from its token ids, fingerprint, press and quantization).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvstore.storage.backends import Entry, temp_target
from kvstore.storage.blob import BlobError, BlobPathError
from kvstore.storage.formats import get_format
from kvstore.storage.store import ContextStore, blob_name, context_id, parse_blob_name, record_for

DEFAULT_GC_GRACE_S = 600.0  # leftovers this fresh are left alone even when no lease is held


@dataclass
class GcReport:
    """What `gc` removed, and what it kept and why."""

    orphan_blobs: list[str] = field(default_factory=list)  # complete blobs of this index no record points to
    temp_files: list[str] = field(default_factory=list)  # leftovers of interrupted writes
    damaged_blobs: list[str] = field(default_factory=list)  # blobs whose header cannot be read
    stale_records: list[str] = field(default_factory=list)  # records whose blob is gone
    orphan_texts: list[str] = field(default_factory=list)  # ids whose search text outlived (or never got) a record
    links: list[str] = field(default_factory=list)  # symbolic links where blobs belong: unlinked, never followed
    kept: list[str] = field(default_factory=list)  # "name: why" for blobs and texts left in place
    freed_bytes: int = 0


@dataclass
class ReindexReport:
    added: list[str] = field(default_factory=list)
    present: int = 0
    skipped: list[str] = field(default_factory=list)  # "name: why"


def gc(store: ContextStore, grace_s: float = DEFAULT_GC_GRACE_S, orphans: bool = False) -> GcReport:
    """Remove records whose blob is gone, texts without a record, then orphans, damaged blobs and temp
    entries (see the module doc)."""
    report = GcReport()
    referenced = _drop_stale_records(store, report)
    _drop_orphan_texts(store, report)
    now = time.time()
    for entry in list(store.backend.list()):
        if entry.name in referenced or now - entry.mtime < grace_s:
            continue
        if entry.link:
            report.freed_bytes += store.backend.delete(entry.name)  # a link: only the link goes
            report.links.append(entry.name)
            continue
        parsed = parse_blob_name(temp_target(entry.name) or entry.name)
        if parsed is None:
            report.kept.append(f"{entry.name}: not a kvstore blob name")
            continue
        lease = store.index.lease(parsed[0])
        if not lease.acquire():
            report.kept.append(f"{entry.name}: a writer holds it")
            continue
        with lease:
            _collect(store, entry, parsed, orphans, report)
    return report


def _drop_stale_records(store: ContextStore, report: GcReport) -> set[str]:
    """Delete records whose blob is gone (under the id's lease); the blob names still referenced."""
    referenced = set()
    for record in store.index.list():
        try:
            name = blob_name(record.id, record.blob_format)
        except BlobError as exc:
            report.kept.append(f"record {record.id[:12]}: {exc}")
            continue
        if store.backend.exists(name):
            referenced.add(name)
            continue
        lease = store.index.lease(record.id)
        if not lease.acquire():
            referenced.add(name)  # a writer is repairing it right now
            continue
        with lease:
            if not store.backend.exists(name) and store.index.delete(record.id, if_created=record.created):
                report.stale_records.append(record.id)
    return referenced


def _drop_orphan_texts(store: ContextStore, report: GcReport) -> None:
    """Delete search texts whose id has no record, each under its text's lease (never a writer's)."""
    recorded = set(store.index.ids())
    for cid in store.texts.ids():
        if cid in recorded:
            continue
        lease = store.texts.lease(cid)
        if not lease.acquire():
            report.kept.append(f"text {cid[:12]}: a writer holds it")
            continue
        with lease:
            if store.index.get(cid) is None:  # not committed since the listing
                store.texts.delete(cid)
                report.orphan_texts.append(cid)


def _collect(store: ContextStore, entry: Entry, parsed: tuple[str, str], orphans: bool, report: GcReport) -> None:
    """Decide about one entry while holding its id's lease."""
    cid, blob_format = parsed
    if temp_target(entry.name) is not None or not entry.complete:
        report.freed_bytes += store.backend.delete(entry.name)
        report.temp_files.append(entry.name)
        return
    record = store.index.get(cid)
    if record is not None and record.blob_format == blob_format:
        return  # committed since the listing
    try:
        _, info = get_format(blob_format).describe(store.backend.open(entry.name))
    except BlobPathError as exc:
        report.kept.append(f"{entry.name}: {exc}")
        return
    except BlobError:
        report.freed_bytes += store.backend.delete(entry.name)
        report.damaged_blobs.append(entry.name)
        return
    owner = info.get("index")
    if owner != store.identity and not orphans:
        why = "written before stores had identities" if owner is None else f"it names another index ({owner})"
        report.kept.append(f"{entry.name}: valid blob without a record, {why} (gc --orphans --yes removes it)")
        return
    report.freed_bytes += store.backend.delete(entry.name)
    report.orphan_blobs.append(entry.name)


def reindex(store: ContextStore) -> ReindexReport:
    """Add a record for every intact blob that has none (the index was lost or emptied)."""
    report = ReindexReport()
    for entry in list(store.backend.list()):
        parsed = parse_blob_name(entry.name)
        if parsed is None or not entry.complete:
            continue
        cid, blob_format = parsed
        if store.index.get(cid) is not None:
            report.present += 1
            continue
        fmt = get_format(blob_format)
        try:
            source = store.backend.open(entry.name)
            header, info = fmt.describe(source)
            if context_id(header.model_fingerprint, fmt.token_ids(source), header.press, header.quant) != cid:
                raise BlobError("its content is not this id's (id recomputed from its tokens and settings)")
        except BlobError as exc:
            report.skipped.append(f"{entry.name}: {exc}")
            continue
        created = float(info.get("created") or entry.mtime)
        record = record_for(cid, header, info, blob_format, entry.size, store.backend.location(entry.name), created)
        if store.index.add(record):
            report.added.append(cid)
        else:
            report.present += 1
    return report
