"""What an audit of the store found (issue 15 §0, §3, §5), each scenario replayed: nothing outside the
store is touched, nothing is readable by others, and gc never deletes live data."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.errors import EXIT_ERROR
from cli.main import main
from kvstore.config import Settings
from kvstore.storage.blob import BlobError, BlobPathError
from kvstore.storage.identity import StoreMismatchError
from kvstore.storage.index import ContextIndex
from kvstore.storage.maintenance import gc, reindex
from kvstore.storage.store import ContextStore, blob_name
from tests.factories import random_compressed
from tests.stores import RedisServer, Target, make_meta


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def edit_record(store: ContextStore, context_id: str, **fields: str) -> None:
    """What anyone who can write the shared Redis can do."""
    store.index.client.hset(store.index._ctx(context_id), mapping=fields)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the store that nothing may touch."""
    folder = tmp_path / "outside"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "precious.txt").write_text("keep me")
    return folder


def untouched(outside: Path) -> bool:
    return (outside / "deep" / "precious.txt").read_text() == "keep me"


# -- §0: paths from the index are never trusted ----------------------------------------------------


@pytest.mark.parametrize("planted", ["absolute", "climbing"])
def test_a_record_naming_another_path_changes_nothing_outside(store_home: Path, outside: Path, planted: str) -> None:
    with ContextStore.open() as store:
        record, _ = store.put(random_compressed(), make_meta())
        bogus = str(outside) if planted == "absolute" else "../../outside/deep"
        edit_record(store, record.id, blob=bogus)
        assert store.load(record.id) is not None  # read from the location its id names, not from the record
    assert run("gc", "--grace", "0").exit_code == 0 and untouched(outside)
    removed = run("rm", record.id)
    assert removed.exit_code == 0, removed.output
    assert untouched(outside) and not (store_home / "blobs" / blob_name(record.id, "safetensors")).exists()


def test_a_symlink_where_a_blob_belongs_is_refused_and_only_unlinked(store_home: Path, outside: Path) -> None:
    with ContextStore.open() as store:
        record, _ = store.put(random_compressed(), make_meta())
        path = store_home / "blobs" / blob_name(record.id, "safetensors")
        path.unlink()
        path.symlink_to(outside / "deep" / "precious.txt")
        with pytest.raises(BlobPathError, match="symbolic link"):
            store.load(record.id)
    asked = run("show", record.id)  # reads only the index: fine
    assert asked.exit_code == 0
    removed = run("rm", record.id)
    assert removed.exit_code == 0 and untouched(outside) and not path.is_symlink()


def test_a_symlinked_shard_is_never_entered(store_home: Path, outside: Path) -> None:
    with ContextStore.open() as store:
        record, _ = store.put(random_compressed(), make_meta())
        shard = store_home / "blobs" / record.id[:2]
        for entry in shard.iterdir():
            entry.rename(outside / entry.name)  # the blob now sits outside, reachable only through the link
        shard.rmdir()
        shard.symlink_to(outside)
        with pytest.raises(BlobPathError, match="symbolic link"):
            store.load(record.id)
    removed = run("rm", record.id)
    assert removed.exit_code == EXIT_ERROR and "left its blob" in removed.output and "symbolic link" in removed.output
    assert untouched(outside) and len(list(outside.iterdir())) == 2  # the moved blob is still there
    collected = run("gc", "--grace", "0")
    assert collected.exit_code == 0 and "unlinked" in collected.output and untouched(outside)
    assert not shard.exists() and len(list(outside.iterdir())) == 2


def test_an_id_or_format_that_is_not_ours_is_refused(store_home: Path) -> None:
    with ContextStore.open() as store:
        record, _ = store.put(random_compressed(), make_meta())
        edit_record(store, record.id, id="../../etc", blob_format="safetensors")
        with pytest.raises(BlobPathError, match="not a content id"):
            store.load(record.id)
        edit_record(store, record.id, id=record.id, blob_format="../x")
        with pytest.raises(Exception, match="unknown blob format"):
            store.load(record.id)


# -- §3: private to the owner ----------------------------------------------------------------------


def test_everything_in_a_new_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        settings = Settings(home=tmp_path / "home", blob_format="zarr")
        with ContextStore.open(settings) as store:
            store.put(random_compressed(), make_meta())
            store.put(random_compressed(seed=2), make_meta(), blob_format="safetensors")
            store.texts.put("x" * 64, "a document's text")
            socket = Path(store.index.client.socket_file)
            paths = [tmp_path / "home", *(tmp_path / "home").rglob("*"), socket, socket.parent]
            modes = {p: stat.S_IMODE(p.lstat().st_mode) for p in paths if not p.is_symlink()}
    finally:
        os.umask(previous)
    assert len(modes) > 20  # blobs, zarr chunks, index files, the socket
    shared = {str(p): oct(m) for p, m in modes.items() if m & 0o077}
    assert not shared


def test_opening_a_store_others_can_read_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    with ContextStore.open(Settings(home=home)):
        pass
    home.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="kvstore.storage"), ContextStore.open(Settings(home=home)):
        pass
    assert "other users can read this store" in caplog.text and str(home) in caplog.text


# -- §5: the right index, and gc that deletes nothing live -----------------------------------------


def test_gc_without_the_index_url_is_refused_and_loses_nothing(store_home: Path, redis_server: RedisServer) -> None:
    shared = Settings(redis_url=redis_server.url)
    with ContextStore.open(shared) as store:
        ids = [store.put(random_compressed(seed=s), make_meta())[0].id for s in (1, 2)]
    forgot = run("gc", "--grace", "0")  # the embedded index of the same home: it knows nothing
    assert forgot.exit_code == EXIT_ERROR and "kvstore reindex" in forgot.output and "Traceback" not in forgot.output
    listed = run("ls")
    assert listed.exit_code == EXIT_ERROR and "does not know the blobs" in listed.output
    with ContextStore.open(shared) as store:
        assert sorted(r.id for r in store.list()) == sorted(ids)
        assert all(store.load(i) is not None for i in ids)


def test_a_redis_that_restarted_empty_is_refused_then_reindexed(store_home: Path, redis_server: RedisServer) -> None:
    shared = Settings(redis_url=redis_server.url)
    with ContextStore.open(shared) as store:
        records = [store.put(random_compressed(seed=s), make_meta(part=s, parts=3))[0] for s in (0, 1, 2)]
    redis_server.restart()
    with pytest.raises(StoreMismatchError, match="kvstore reindex"):
        ContextStore.open(shared)
    rebuilt = run("reindex", "--redis-url", redis_server.url)
    assert rebuilt.exit_code == 0 and "added 3 records" in rebuilt.output, rebuilt.output
    with ContextStore.open(shared) as store:
        back = {r.id: r for r in store.list()}
        assert set(back) == {r.id for r in records}
        for record in records:
            again = back[record.id]
            assert (again.part, again.parts, again.source, again.checksum) == (
                record.part,
                record.parts,
                record.source,
                record.checksum,
            )
            assert (again.kept_pairs, again.total_pairs, again.full_bytes, again.bytes) == (
                record.kept_pairs,
                record.total_pairs,
                record.full_bytes,
                record.bytes,
            )
            assert again.ratio_achieved == pytest.approx(record.ratio_achieved)
            assert store.load(record.id) is not None


def test_reindex_refuses_a_blob_that_is_not_its_ids_content(tmp_path: Path) -> None:
    target = Target(None, "kvstore:v1:", tmp_path / "home")
    with target.open() as store:
        a, _ = store.put(random_compressed(seed=1), make_meta())
        b, _ = store.put(random_compressed(seed=2), make_meta())
        name_a, name_b = blob_name(a.id, "safetensors"), blob_name(b.id, "safetensors")
        target.raw_write(name_b, target.raw_read(name_a))  # a's content at b's address
        for record in (a, b):
            store.index.delete(record.id)
        report = reindex(store)
    assert report.added == [a.id] and len(report.skipped) == 1 and "not this id's" in report.skipped[0]


@pytest.mark.parametrize("lie", [{"part": "x"}, {"parts": None}, {"created": "yesterday"}])
def test_reindex_skips_a_blob_whose_resealed_record_info_lies(tmp_path: Path, lie: dict) -> None:
    """The record info a blob keeps is sealed by its own sha256, which anyone can recompute: its types are
    checked, so one crafted blob is skipped with a reason instead of stopping reindex with a traceback."""
    from kvstore.storage.blob import METADATA_KEY, RECORD_KEY, parse_record, record_text
    from kvstore.storage.formats import get_format

    target = Target(None, "kvstore:v1:", tmp_path / "home")
    with target.open() as store:
        a, _ = store.put(random_compressed(seed=1), make_meta())
        b, _ = store.put(random_compressed(seed=2), make_meta())
        name_b = blob_name(b.id, "safetensors")
        source = store.backend.open(name_b)
        header, info = get_format("safetensors").describe(source)
        from safetensors.torch import load, save

        data = target.raw_read(name_b)
        metadata = {METADATA_KEY: header.to_json(), RECORD_KEY: record_text({**info, **lie})}
        target.raw_delete(name_b)
        target.raw_write(name_b, save(load(data), metadata=metadata))
        with pytest.raises(BlobError, match="record info field"):
            parse_record(metadata[RECORD_KEY])
        for record in (a, b):
            store.index.delete(record.id)
        report = reindex(store)
    assert report.added == [a.id] and len(report.skipped) == 1 and "the wrong type" in report.skipped[0]


def test_ls_on_an_empty_index_with_blobs_says_so(store_home: Path) -> None:
    with ContextStore.open() as store:
        record, _ = store.put(random_compressed(), make_meta())
        store.index.delete(record.id)  # the records went (a flushed index), the blobs stayed
    listed = run("ls")
    assert listed.exit_code == 0 and "1 blobs are stored" in listed.output and "kvstore reindex" in listed.output


def test_a_store_with_another_index_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with ContextStore(home, ContextIndex.open(None, home, "kvstore:v1:")) as store:
        store.put(random_compressed(), make_meta())
    for prefix, identity, message in [
        ("other:v1:", None, "does not know the blobs"),
        ("third:v1:", "f" * 32, "belong"),
    ]:
        index = ContextIndex.open(None, home, prefix)
        if identity:
            index.claim_identity(identity)  # an index made for another store
        with pytest.raises(StoreMismatchError, match=message):
            ContextStore(home, index)
        index.close()
    with ContextStore(home, ContextIndex.open(None, home, "kvstore:v1:")) as store:
        assert len(store.list()) == 1


def test_a_store_being_created_by_another_process_opens_once_its_identity_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A creator claims the index, then writes the blobs' identity a moment later: a process opening the
    store in between (several workers starting at once) waits for it instead of refusing the store."""
    from kvstore.storage import identity as identity_module
    from kvstore.storage.backends.local import LocalBackend

    home = tmp_path / "home"
    index = ContextIndex.open(None, home, "kvstore:v1:")
    index.claim_identity("a" * 32)  # the creator is between its two writes
    backend = LocalBackend(home / "blobs")
    late = threading.Timer(0.3, lambda: backend.put_meta("store.json", b'{"index": "' + b"a" * 32 + b'"}'))
    late.start()
    with ContextStore(home, index, backend=backend) as store:
        assert store.identity == "a" * 32
    late.join()
    monkeypatch.setattr(identity_module, "CREATION_WAIT_S", 0.2)  # nobody writes it: refused after the wait
    other = ContextIndex.open(None, home, "other:v1:")
    other.claim_identity("b" * 32)
    with pytest.raises(StoreMismatchError, match="belong"):
        ContextStore(tmp_path / "elsewhere", other)
    other.close()


class Paused:
    """Stop a writer thread at one call until released."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def wrap(self, original):  # noqa: ANN001, ANN201
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.reached.set()
            assert self.go.wait(30)
            return original(*args, **kwargs)

        return wrapper


def _writer(store: ContextStore, compressed, results: list) -> threading.Thread:  # noqa: ANN001
    thread = threading.Thread(target=lambda: results.append(store.put(compressed, make_meta())))
    thread.start()
    return thread


def test_gc_leaves_a_blob_whose_writer_has_not_committed_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Target(None, "kvstore:v1:", tmp_path / "home").open() as store:
        paused = Paused()
        monkeypatch.setattr(store.index, "add", paused.wrap(store.index.add))
        results: list = []
        writer = _writer(store, random_compressed(), results)
        assert paused.reached.wait(30)  # published, record not written: the moment gc --grace 0 raced
        report = gc(store, grace_s=0)
        assert report.orphan_blobs == [] and any("a writer holds it" in k for k in report.kept)
        paused.go.set()
        writer.join(30)
        record, created = results[0]
        assert created and store.load(record.id) is not None


def test_gc_leaves_a_temp_file_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvstore.storage.backends.local as local

    with Target(None, "kvstore:v1:", tmp_path / "home").open() as store:
        paused = Paused()
        original = local.write_private

        def half_then_wait(path: Path, data: bytes) -> None:
            path.write_bytes(data[: len(data) // 2])
            paused.wrap(lambda: None)()
            path.unlink()
            original(path, data)

        monkeypatch.setattr(local, "write_private", half_then_wait)
        results: list = []
        writer = _writer(store, random_compressed(), results)
        assert paused.reached.wait(30)
        assert [e.complete for e in store.backend.list()] == [False]  # the temp file, mid write
        report = gc(store, grace_s=0)
        assert report.temp_files == [] and len(report.kept) == 1
        paused.go.set()
        writer.join(30)
        assert results[0][1] and store.load(results[0][0].id) is not None


def test_an_old_orphan_adopted_by_a_new_ingest_survives_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Target(None, "kvstore:v1:", tmp_path / "home")
    compressed = random_compressed()
    with target.open() as store:
        record, _ = store.put(compressed, make_meta())
        store.index.delete(record.id)  # the blob is an orphan now (a writer that died before its record)
        path = target.home / "blobs" / blob_name(record.id, "safetensors")
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # old: past any grace period
        paused = Paused()
        monkeypatch.setattr(store.index, "add", paused.wrap(store.index.add))
        results: list = []
        writer = _writer(store, compressed, results)
        assert paused.reached.wait(30)  # adopted, about to commit
        assert gc(store).orphan_blobs == []
        paused.go.set()
        writer.join(30)
        assert results[0][1] and store.load(record.id) is not None and path.exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_ingest_repairs_a_record_whose_blob_is_missing_or_corrupt(tmp_path: Path, damage: str) -> None:
    from kvstore.ingest import ingest_text
    from kvstore.presses import make_press
    from tests.tiny import sample_text, tiny_model

    loaded, press, text = tiny_model("llama"), make_press("streaming", 0.5), sample_text(60, seed=3)
    target = Target(None, "kvstore:v1:", tmp_path / "home")
    with target.open() as store:
        first = ingest_text(loaded, store, text, press)[0].record
        name = blob_name(first.id, first.blob_format)
        if damage == "missing":
            target.raw_delete(name)
        else:
            data = bytearray(target.raw_read(name))
            data[-20] ^= 0x40  # a tensor byte: the header still reads
            target.raw_write(name, bytes(data))
        again = ingest_text(loaded, store, text, press)
        assert again[0].created and again[0].record.id == first.id  # repaired, not "skipped (duplicate)"
        assert store.intact(again[0].record, loaded.kv_shape) and store.load(first.id) is not None
