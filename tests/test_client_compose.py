"""The client answers once from several stored contexts: lists of refs, long documents, retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvstore import KVStore, search
from kvstore.decode.answer import Answer, Source
from kvstore.decode.cache import CompressedCache
from kvstore.decode.compose import compose
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.rotary import PositionError
from kvstore.errors import InputError, NotFoundError
from tests.tiny import sample_text, tiny_model

OPTIONS = GenerationOptions(max_new_tokens=6)


@pytest.fixture
def kv(store_home: Path):
    with KVStore(model="tiny-llama", press="kvzip", ratio=0.5) as client:
        client._models["tiny-llama"] = tiny_model("llama", seed=7)  # the test's model, as if loaded by name
        yield client


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the BM25 indexes built while the test runs."""
    built: list[int] = []
    original = search._indexed
    monkeypatch.setattr(search, "_indexed", lambda texts: built.append(len(texts)) or original(texts))
    return built


def _ingest(kv: KVStore, texts: list[str]) -> list[str]:
    return [kv.ingest_text(text, source=f"doc{i}.txt")[0].record.id for i, text in enumerate(texts)]


def test_a_list_of_refs_is_composed_in_order_and_answered_once(kv: KVStore) -> None:
    ids = _ingest(kv, [sample_text(60, seed=s) for s in (1, 2, 3)])
    answer = kv.ask(ids, "the vault", OPTIONS)
    assert answer.contexts == tuple(ids) and isinstance(answer, str)
    loaded = kv.model()
    parts = [kv.store.load(i, loaded.fingerprint) for i in ids]
    [expected] = answer_many(loaded, CompressedCache(compose(loaded, parts)), ["the vault"], OPTIONS)
    assert answer == expected
    assert answer.prompt_tokens == compose(loaded, parts).original_length + len(loaded.frame.question_ids("the vault"))
    assert kv.prepare(ids, ["x"]) is kv.prepare(ids, ["y"])  # composed once, then reused
    batch = kv.ask_many(ids, ["the vault", "users"], OPTIONS)
    assert batch[0] == answer and all(a.contexts == tuple(ids) for a in batch)
    assert "".join(kv.stream(ids, "the vault", OPTIONS)) == answer


def test_bad_lists_of_refs_are_refused_with_one_clear_error(kv: KVStore) -> None:
    a, b = _ingest(kv, [sample_text(40, seed=4), sample_text(40, seed=6)])
    with pytest.raises(InputError, match="no contexts given"):
        kv.ask([], "anything?")
    with pytest.raises(NotFoundError, match="no stored context for 'feedfacecafe'"):
        kv.ask([a, "feedfacecafe"], "anything?")
    kv._models["tiny-qwen3"] = tiny_model("qwen3")
    [other] = kv.ingest_text(sample_text(40, seed=5), model="tiny-qwen3")
    with pytest.raises(InputError, match="stored by different models"):
        kv.ask([a, other.record.id], "anything?")
    config = kv.model().model.config
    reserve = len(kv.model().frame.question_ids("anything?")) + OPTIONS.max_new_tokens
    alone = kv.store.get(a).original_length + reserve
    window, config.max_position_embeddings = config.max_position_embeddings, alone
    try:
        assert kv.ask(a, "anything?", OPTIONS).contexts == (a,)  # fits exactly
        with pytest.raises(PositionError, match=f"window of {alone:,} tokens"):
            kv.ask([a, b[:10]], "anything?", OPTIONS)  # two ids (one a prefix) do not fit
    finally:
        config.max_position_embeddings = window
    assert len(kv.store.list()) == 3  # nothing was stored or changed by the refusals


def test_a_long_document_keeps_the_parts_relevant_to_the_question(
    kv: KVStore, tmp_path: Path, builds: list[int]
) -> None:
    config = kv.model().model.config
    window, config.max_position_embeddings = config.max_position_embeddings, 640
    try:
        paragraphs = [sample_text(60, seed=20 + i) for i in range(6)]
        paragraphs[3] += " The lighthouse keeper is called Zebulon."
        doc = tmp_path / "long.txt"
        doc.write_text("\n\n".join(paragraphs))
        parts = kv.ingest_files([doc])
        assert len(parts) > 2
        _ingest(kv, [sample_text(40, seed=s) for s in (1, 2)])  # other documents share the store's index
        assert kv.search("lighthouse keeper", k=2) and builds == [len(parts) + 2]
        answer = kv.ask(str(doc), "Who is the lighthouse keeper Zebulon?", OPTIONS)
        used = [kv.store.require(i) for i in answer.contexts]
        assert 0 < len(used) < len(parts)  # not everything fits: the most relevant parts were kept
        assert any("Zebulon" in kv.searcher.text(r.id) for r in used)
        assert [r.part for r in used] == sorted(r.part for r in used)  # in document order
        assert answer.prompt_tokens + OPTIONS.max_new_tokens <= 640
        assert answer.sources == tuple(Source(r.id, str(doc), r.part, len(parts)) for r in used)
        assert kv.search("lighthouse keeper", k=2) and builds == [len(parts) + 2]  # selection kept the index
    finally:
        config.max_position_embeddings = window


def test_search_ranks_parts_without_reading_blobs_and_retrieval_answers_once(
    kv: KVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [sample_text(50, seed=30 + i) for i in range(4)]
    texts[2] += " The archive is kept in the city of Quillport."
    ids = _ingest(kv, texts)
    loads = []
    monkeypatch.setattr(kv.store, "load", lambda *a, **k: loads.append(a) or pytest.fail("search read a blob"))
    hits = kv.search("Which city keeps the archive, Quillport?", k=3)
    assert hits[0].id == ids[2] and hits[0].source == "doc2.txt" and (hits[0].part, hits[0].parts) == (0, 1)
    assert hits[0].score > 0 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    monkeypatch.undo()
    answer = kv.retrieve_and_ask("Which city keeps the archive, Quillport?", k=2, options=OPTIONS)
    assert answer.contexts[-1] == ids[2] and set(answer.contexts) <= {h.id for h in hits}  # best last
    assert [by_score.id for by_score in hits[: len(answer.contexts)]] == list(reversed(answer.contexts))
    by_id = {h.id: h for h in hits}
    assert [(s.id, s.source, s.part, s.parts, s.score) for s in answer.sources] == [
        (i, by_id[i].source, 0, 1, by_id[i].score) for i in answer.contexts
    ]
    sent = json.loads(json.dumps(answer.to_dict()))  # JSON-safe: how a worker or a script hands it on
    assert sent["sources"][-1] == {"id": ids[2], "source": "doc2.txt", "part": 0, "parts": 1, "score": hits[0].score}
    assert Answer.from_dict(sent).sources == tuple(Source(**s.to_dict()) for s in answer.sources)
    kv.store.delete(ids[2])
    assert all(h.id != ids[2] for h in kv.search("Quillport archive", k=4))  # deleted: its text is gone too
    assert kv.store.texts.get_many([ids[2]]) == {}


@pytest.mark.parametrize("many", [0, search.MANY], ids=["listing", "per-id"])  # how new records are read
def test_the_search_index_is_rebuilt_only_when_the_stored_ids_change(
    kv: KVStore, builds: list[int], many: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "MANY", many)
    a, b, c = _ingest(kv, [sample_text(30, seed=s) + " Quillport" for s in (40, 41, 42)])
    kv.store.texts.delete(b)  # as if reindexed from its blob: a record without a text
    ranked = [h.id for h in kv.search("Quillport", k=3)]
    assert sorted(ranked) == sorted([a, c]) and builds == [2]
    assert [h.id for h in kv.searcher.search("Quillport", k=3, where=lambda r: r.id == c)] == [c]
    assert kv.searcher.search("Quillport", where=lambda r: False) == []
    assert [h.id for h in kv.search("Quillport", k=3)] == ranked and builds == [2]  # no rebuild for a filter
    [d] = _ingest(kv, [sample_text(30, seed=43)])
    assert [h.id for h in kv.search("Quillport", k=4)] == ranked and builds == [2, 3]
    kv.store.delete(d)
    assert [h.id for h in kv.search("Quillport", k=4)] == ranked and builds == [2, 3, 2]


def test_untrusted_refs_never_load_another_model_or_read_a_path(store_home: Path, tmp_path: Path) -> None:
    """A server's callers and a worker's task messages name contexts; a record planted in a shared index
    can name any model (a local directory, a hub id): with untrusted refs only the served model answers."""
    from tests.factories import random_compressed
    from tests.stores import make_meta

    with KVStore(model="tiny-llama", untrusted_refs=True) as client:
        client._models["tiny-llama"] = tiny_model("llama", seed=7)
        planted, _ = client.store.put(random_compressed(), make_meta(model=str(tmp_path), model_fingerprint="fp-x"))
        with pytest.raises(InputError, match="only 'tiny-llama'"):
            client.ask(planted.id, "what is stored?", OPTIONS)
        assert list(client._models) == ["tiny-llama"]  # nothing else was loaded
        document = tmp_path / "doc.txt"
        document.write_text("a document on the server's disk")
        with pytest.raises(NotFoundError):
            client.ask(str(document), "what does it say?", OPTIONS)
