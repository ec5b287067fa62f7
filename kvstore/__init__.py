"""kvstore: prefill documents once, compress their KV caches with KVzip, store them, answer many questions.

`KVStore`, `LoadedContext` and `Settings` are loaded on first use, so importing a light module such
as `kvstore.config` or `kvstore.storage.index` does not pull in torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("kvstore")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "KVStore": "kvstore.client",
    "LoadedContext": "kvstore.client",
    "Settings": "kvstore.config",
    "Answer": "kvstore.decode.answer",
    "GenerationOptions": "kvstore.decode.generation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
