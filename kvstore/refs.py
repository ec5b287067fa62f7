"""Context references as users type them (an id, a unique id prefix, a document path) -> stored records.

Reads only the index, never a blob or the model, so listing, showing and removing stay instant.
A document maps to one group of records per (model, press, quantization) it was stored under; a
group is complete when every part of the document is in it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvstore.config import Settings
from kvstore.errors import InputError
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextNotFoundError, ContextStore, document_sha256
from kvstore.text.documents import read_document

MIN_ID_PREFIX = 6


@dataclass(frozen=True)
class StoredDocument:
    """The parts of one document stored under one set of settings, in part order."""

    records: list[ContextRecord]

    @property
    def parts(self) -> int:
        return self.records[0].parts

    @property
    def complete(self) -> bool:
        return sorted(r.part for r in self.records) == list(range(self.parts))

    @property
    def newest(self) -> float:
        return max(r.created for r in self.records)


def _settings_key(record: ContextRecord) -> tuple[str, str, str]:
    return record.model_fingerprint, json.dumps(record.press, sort_keys=True), record.quant


def stored_versions(store: ContextStore, text: str) -> list[StoredDocument]:
    """Every stored version of a document's text, newest first."""
    sha = document_sha256(text.strip())
    groups: dict[tuple[str, str, str], list[ContextRecord]] = {}
    for record in store.index.by_document(sha):
        groups.setdefault(_settings_key(record), []).append(record)
    versions = [StoredDocument(sorted(g, key=lambda r: (r.part, r.created))) for g in groups.values()]
    return sorted(versions, key=lambda v: -v.newest)


def incomplete_ids(records: list[ContextRecord]) -> set[str]:
    """Ids of the records (among `records`, the whole store's) whose document is missing parts.

    An ingest killed between parts leaves such a group; `ls` marks it and asking by path refuses it.
    """
    groups: dict[tuple[str, str, str, str], list[ContextRecord]] = {}
    for record in records:
        groups.setdefault((record.document_sha256, *_settings_key(record)), []).append(record)
    versions = (StoredDocument(group) for group in groups.values())
    return {r.id for version in versions if not version.complete for r in version.records}


Preference = Callable[[ContextRecord], bool]


def stored_under(settings: Settings) -> Preference:
    """Prefer records stored under these settings' model name, quantization and plain press + ratio."""
    return lambda record: matches(record, settings)


def matches(record: ContextRecord, settings: Settings) -> bool:
    """Whether a record was stored under these settings' model name, quantization and plain press + ratio."""
    press = record.press
    same_press = press.get("press") == settings.press and press.get("compression_ratio") == settings.ratio
    return record.model == settings.model and record.quant == settings.quant and same_press


def pick_version(versions: list[StoredDocument], ref: str, prefer: Preference | None = None) -> StoredDocument:
    """The version `prefer` picks when there is one, else the newest; an incomplete one is refused."""
    if not versions:
        raise ContextNotFoundError(f"{ref} has not been ingested yet: run `kvstore ingest {ref}`")
    preferred = [v for v in versions if prefer is not None and prefer(v.records[0])]
    chosen = (preferred or versions)[0]
    if not chosen.complete:
        raise InputError(
            f"{ref} is incomplete in the store: {len(chosen.records)} of {chosen.parts} parts were stored "
            "(an ingest was interrupted); run `kvstore ingest` on it again"
        )
    return chosen


def resolve(store: ContextStore, ref: str, prefer: Preference | None = None, paths: bool = True) -> list[ContextRecord]:
    """Records for an id, a unique id prefix, or (when `paths`) the path of an ingested document.

    A server resolving refs for remote callers passes paths=False: they must never make it read a file.
    """
    if not ref or not ref.strip():
        raise InputError("empty context reference: give an id, an id prefix or a document path")
    record = store.get(ref)
    if record is not None:
        return [record]
    path = Path(ref).expanduser()
    if paths and path.is_file():
        return pick_version(stored_versions(store, read_document(path)), ref, prefer).records
    if len(ref) >= MIN_ID_PREFIX:
        matches_ = [cid for cid in store.index.ids() if cid.startswith(ref)]
        if len(matches_) == 1:
            return [store.require(matches_[0])]
        if matches_:
            raise ContextNotFoundError(f"id prefix {ref!r} is ambiguous ({len(matches_)} contexts)")
    what = "an id, an id prefix or an ingested file" if paths else "an id or an id prefix"
    raise ContextNotFoundError(f"no stored context for {ref!r} ({what})")
