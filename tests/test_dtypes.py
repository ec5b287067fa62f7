"""Contexts move between machines (issue 15 §4): the weights fingerprint names the weights, not the dtype
they were loaded in; storage dtype is a setting; a load casts the stored K/V to the reading model's dtype."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstore import KVStore
from kvstore.config import Settings, SettingsError
from kvstore.decode.cache import CompressedCache
from kvstore.engine.models import prepare_model
from kvstore.ingest import ingest_text
from kvstore.presses import make_press
from kvstore.storage.blob import BlobError
from kvstore.storage.store import ContextStore
from tests.factories import random_compressed
from tests.stores import make_meta
from tests.tiny import sample_text, tiny_model

ROOT = Path(__file__).resolve().parents[1]
KVSTORE = str(Path(sys.executable).with_name("kvstore"))
LIGHTHOUSE = ROOT / "examples" / "docs" / "lighthouse.md"
QUESTION = "What color is the lighthouse door?"


def test_the_weights_fingerprint_names_the_weights_not_the_load_dtype() -> None:
    f32, other = tiny_model("qwen3"), tiny_model("qwen3", seed=1)
    bf16 = tiny_model("qwen3")
    bf16 = prepare_model(bf16.name, bf16.model.to(torch.bfloat16), bf16.tokenizer)
    assert bf16.model.dtype == torch.bfloat16
    assert f32.fingerprint == bf16.fingerprint != other.fingerprint


def test_dtype_settings_are_checked_where_they_enter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(dtype="bfloat16", storage_dtype="float16").storage_dtype == "float16"
    monkeypatch.setenv("KVSTORE_STORAGE_DTYPE", "float8")
    with pytest.raises(SettingsError, match="KVSTORE_STORAGE_DTYPE"):
        Settings()


def test_float16_storage_refuses_values_it_cannot_hold_and_stores_nothing(tmp_path: Path) -> None:
    store = ContextStore.open(Settings(home=tmp_path / "home", redis_url=None, storage_dtype="float16"))
    try:
        compressed = random_compressed()
        compressed.layers[1].values[0, 0] = 1e6  # float16 tops out at 65,504
        with pytest.raises(BlobError, match="exceed float16's range: store them as bfloat16 or float32"):
            store.put(compressed, make_meta())
        assert store.list() == [] and list(store.backend.list()) == []
        record, created = store.put(random_compressed(), make_meta())  # values in range: stored in float16
        assert created and record.dtype == "float16"
    finally:
        store.close()


def test_bfloat16_storage_halves_the_blob_and_decodes_in_the_models_dtype(tmp_path: Path) -> None:
    loaded, press, text = tiny_model("llama"), make_press("streaming", 0.5), sample_text(80, seed=2)
    stored = {}
    for dtype in ("auto", "bfloat16"):
        settings = Settings(home=tmp_path / dtype, redis_url=None, storage_dtype=dtype)
        with ContextStore.open(settings) as store:
            record = ingest_text(loaded, store, text, press)[0].record
            cache = CompressedCache.from_store(store, record.id, loaded)
            stored[dtype] = (record, cache)
    (full, full_cache), (half, half_cache) = stored["auto"], stored["bfloat16"]
    assert full.id == half.id and (full.dtype, half.dtype) == ("float32", "bfloat16")
    assert 0.45 < half.bytes / full.bytes < 0.56
    assert half_cache.layers[0].prefix.keys.dtype == torch.float32  # cast for the float32 model on load
    question = torch.tensor([loaded.frame.question_ids("What is the passcode?")])
    positions = torch.arange(full.original_length, full.original_length + question.shape[1])[None]
    with torch.no_grad():
        logits = [
            loaded.model(question, cache=cache, position_ids=positions).logits[0, -1]
            for cache in (full_cache, half_cache)
        ]
    assert not torch.equal(*logits)  # bfloat16 rounding did happen ...
    assert torch.allclose(*logits, atol=0.01 * float(logits[0].abs().max()))  # ... and cost about nothing


def _cli(home: Path, *args: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("KVSTORE_REDIS_URL", "KVSTORE_DTYPE")}
    done = subprocess.run(
        [KVSTORE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "KVSTORE_HOME": str(home), **env},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    return done.stdout


@pytest.mark.model
def test_a_context_prefilled_in_bfloat16_answers_a_float32_client_and_back(tmp_path: Path) -> None:
    # A "GPU worker" (the default model loaded in bfloat16) ingests; a float32 client in this process answers.
    gpu_home = tmp_path / "from-bf16"
    _cli(gpu_home, "ingest", str(LIGHTHOUSE), KVSTORE_DTYPE="bfloat16")
    with KVStore(home=gpu_home, redis_url=None) as client:
        [record] = client.store.list()
        assert record.dtype == "bfloat16" and client.model().model.dtype == torch.float32
        assert "green" in client.ask(str(LIGHTHOUSE), QUESTION, max_new_tokens=16).lower()
    # And back: this float32 process ingests; a bfloat16 client in another process answers.
    cpu_home = tmp_path / "from-f32"
    with KVStore(home=cpu_home, redis_url=None) as client:
        [part] = client.ingest_files([LIGHTHOUSE])
        assert part.record.dtype == "float32" and part.record.id == record.id  # same weights, same content id
    answer = _cli(cpu_home, "ask", str(LIGHTHOUSE), QUESTION, "--max-new-tokens", "16", KVSTORE_DTYPE="bfloat16")
    assert "green" in answer.lower()
