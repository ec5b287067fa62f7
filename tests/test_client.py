"""The Python client on the real default model: batched questions, streaming, generate(), caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore import KVStore
from kvstore.text.prompt import ChatFrame

pytestmark = pytest.mark.model

DOC = (Path(__file__).resolve().parents[1] / "examples" / "docs" / "lighthouse.md").read_text()
QUESTIONS = ["What color is the lighthouse door?", "When was the lighthouse built?", "Who painted the door?"]


@pytest.fixture
def client(store_home: Path) -> KVStore:
    with KVStore(ratio=0.5) as kv:
        yield kv


def test_ask_many_equals_asking_one_by_one(client: KVStore) -> None:
    [part] = client.ingest_text(DOC, source="lighthouse.md")
    batched = client.ask_many(part.record.id, QUESTIONS, max_new_tokens=24)
    single = [client.ask(part.record.id, q, max_new_tokens=24) for q in QUESTIONS]
    assert batched == single
    assert "green" in batched[0].lower() and "1871" in batched[1]


def test_stream_yields_the_same_text_as_ask(client: KVStore) -> None:
    [part] = client.ingest_text(DOC, source="lighthouse.md")
    streamed = "".join(client.stream(part.record.id, QUESTIONS[0], max_new_tokens=24))
    assert len(list(client.stream(part.record.id, QUESTIONS[0], max_new_tokens=24))) > 1
    assert streamed.strip() == client.ask(part.record.id, QUESTIONS[0], max_new_tokens=24)


def test_contexts_and_models_are_cached_and_generate_works(client: KVStore) -> None:
    [part] = client.ingest_text(DOC, source="lighthouse.md")
    context = client.context(part.record.id)
    assert client.context(part.record.id) is context and client.model() is context.loaded
    cache = client.cache(part.record.id)
    frame = ChatFrame.for_tokenizer(context.loaded.tokenizer)
    ids = torch.cat([cache.compressed.token_ids[None].long(), torch.tensor([frame.question_ids(QUESTIONS[0])])], 1)
    out = context.loaded.model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False)
    cache.reset()
    text = context.loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "green" in text.lower()


def test_resolve_by_path_and_id_prefix(client: KVStore, tmp_path: Path) -> None:
    doc = tmp_path / "lighthouse.md"
    doc.write_text(DOC)
    [part] = client.ingest_files([doc])
    assert [r.id for r in client.resolve(str(doc))] == [part.record.id]
    assert [r.id for r in client.resolve(part.record.id[:10])] == [part.record.id]
