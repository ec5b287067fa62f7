"""Our own calls into transformers, torch and Celery use their current APIs: no FutureWarning or
DeprecationWarning on the paths every user runs (ingest, load, ask, stream, generate)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many, stream_answer
from kvstore.ingest import ingest_text
from kvstore.presses import parse_press_spec
from kvstore.storage.store import ContextStore
from tests.tiny import sample_text, tiny_model


def test_the_main_paths_raise_no_deprecation_warning(store_home: Path) -> None:
    loaded = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with ContextStore.open() as store:
            [part] = ingest_text(loaded, store, sample_text(80), parse_press_spec("kvzip:0.5"), source="doc")
            cache = CompressedCache(store.load(part.record.id, loaded.fingerprint))
        answers = answer_many(loaded, cache, ["the vault", "users"], GenerationOptions(max_new_tokens=4))
        streamed = "".join(stream_answer(loaded, cache, "the vault", GenerationOptions(max_new_tokens=4)))
        sampled = answer_many(loaded, cache, ["users"], GenerationOptions(max_new_tokens=4, temperature=0.7, seed=1))
        ids = torch.cat([cache.compressed.token_ids[None].long(), torch.tensor([[5, 6, 7]])], dim=1)
        generated = loaded.model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False)
        cache.reset()
    assert len(answers) == 2 and streamed == answers[0] and len(sampled) == 1
    assert generated.shape[1] == ids.shape[1] + 3
