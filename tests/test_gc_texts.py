"""Search texts never outlive their records: gc collects a text without a record, but never the text of
an ingest in progress (its writer's lease), and a failed ingest leaves no text behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvstore.ingest import ingest_text
from kvstore.presses import make_press
from kvstore.storage.blob import BlobError
from kvstore.storage.maintenance import gc
from kvstore.storage.store import blob_name
from tests.factories import random_compressed
from tests.stores import Target, make_meta
from tests.tiny import sample_text, tiny_model

NO_RECORD = "f" * 64


def test_gc_removes_texts_without_a_record_and_keeps_the_others(tmp_path: Path) -> None:
    target = Target(None, "kvstore:v1:", tmp_path / "home")
    with target.open() as store:
        kept, _ = store.put(random_compressed(seed=1), make_meta())
        lost, _ = store.put(random_compressed(seed=2), make_meta())
        for record in (kept, lost):
            store.texts.put(record.id, f"text of {record.id}")
        store.texts.put(NO_RECORD, "left by an ingest that died before its record")
        store.backend.delete(blob_name(lost.id, lost.blob_format))  # its record goes stale
        report = gc(store, grace_s=0)
        assert report.stale_records == [lost.id]
        assert sorted(report.orphan_texts) == sorted([lost.id, NO_RECORD])
        assert store.texts.ids() == [kept.id] and store.texts.get_many([kept.id]) == {kept.id: f"text of {kept.id}"}
        assert gc(store, grace_s=0).orphan_texts == []


def test_gc_leaves_the_text_of_an_ingest_that_has_not_committed_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, press, text = tiny_model("llama"), make_press("kvzip", 0.5), sample_text(40, seed=5)
    with Target(None, "kvstore:v1:", tmp_path / "home").open() as store:
        committing, go = threading.Event(), threading.Event()
        add = store.index.add

        def paused_add(record: object) -> bool:
            committing.set()  # text and blob written, record not yet: the moment gc raced
            assert go.wait(30)
            return add(record)

        monkeypatch.setattr(store.index, "add", paused_add)
        results: list = []
        writer = threading.Thread(target=lambda: results.append(ingest_text(loaded, store, text, press)))
        writer.start()
        try:
            assert committing.wait(60)
            [cid] = store.texts.ids()
            report = gc(store, grace_s=0)
            assert report.orphan_texts == [] and f"text {cid[:12]}: a writer holds it" in report.kept
        finally:
            go.set()
            writer.join(60)
        [part] = results[0]
        assert part.created and part.record.id == cid
        assert gc(store, grace_s=0).orphan_texts == [] and store.texts.get_many([cid]) == {cid: text}


def test_a_failed_ingest_leaves_no_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded, press = tiny_model("llama"), make_press("kvzip", 0.5)
    with Target(None, "kvstore:v1:", tmp_path / "home").open() as store:

        def disk_full(*args: object, **kwargs: object) -> None:
            raise BlobError("no space left on device")

        monkeypatch.setattr(store, "put", disk_full)
        with pytest.raises(BlobError, match="no space"):
            ingest_text(loaded, store, sample_text(40, seed=6), press)
        assert store.texts.ids() == [] and store.list() == []
