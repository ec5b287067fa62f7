"""Settings shared by the library, the CLI and the workers, read from env vars with flag overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


@dataclass(frozen=True)
class Settings:
    """Where things live and which defaults apply; every field has an env var (see README)."""

    home: Path = field(default_factory=lambda: _env_path("KVSTORE_HOME", Path.home() / ".kvstore"))
    redis_url: str | None = field(default_factory=lambda: os.environ.get("KVSTORE_REDIS_URL") or None)
    model: str = field(default_factory=lambda: os.environ.get("KVSTORE_MODEL", DEFAULT_MODEL))
    press: str = field(default_factory=lambda: os.environ.get("KVSTORE_PRESS", "kvzip"))
    ratio: float = field(default_factory=lambda: float(os.environ.get("KVSTORE_RATIO", "0.75")))
    quant: str = field(default_factory=lambda: os.environ.get("KVSTORE_QUANT", "none"))
    blob_format: str = field(default_factory=lambda: os.environ.get("KVSTORE_FORMAT", "safetensors"))
    device: str = field(default_factory=lambda: os.environ.get("KVSTORE_DEVICE", "auto"))

    @property
    def model_cache_dir(self) -> Path:
        """Converted model weights live here (shared across stores unless KVSTORE_MODEL_CACHE is set)."""
        return _env_path("KVSTORE_MODEL_CACHE", Path.home() / ".cache" / "kvstore" / "models")

    def with_overrides(self, **overrides: object) -> Settings:
        """Apply CLI flags on top of the environment; None means 'not given'."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
