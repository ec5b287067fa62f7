"""kvstore: prefill documents once, compress their KV caches with KVzip, store them, answer many questions."""

from kvstore.client import KVStore, LoadedContext
from kvstore.config import Settings

__all__ = ["KVStore", "LoadedContext", "Settings"]
