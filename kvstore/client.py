"""The Python client: ingest documents, load compressed contexts, and ask questions against them.

Loaded models and contexts are kept in the client, so a second question to the same context costs
only decoding: no prefill, no blob read.

    from kvstore import KVStore
    kv = KVStore()                      # ~/.kvstore with embedded Redis; KVStore(home=..., redis_url=...)
    [part] = kv.ingest_text("The door is green.", source="note")
    kv.ask(part.record.id, "What color is the door?")
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvstore.config import Settings
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import DEFAULT_MAX_NEW_TOKENS, answer_many, stream_answer
from kvstore.engine.models import LoadedModel, load_model
from kvstore.ingest import IngestedPart, ingest_text
from kvstore.presses import parse_press_spec
from kvstore.presses.base import Press
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextNotFoundError, ContextStore, document_sha256
from kvstore.text.documents import discover, read_document

MIN_ID_PREFIX = 6


@dataclass
class LoadedContext:
    """A stored context in memory, ready for questions."""

    record: ContextRecord
    loaded: LoadedModel
    cache: CompressedCache

    def ask(self, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
        return self.ask_many([question], max_new_tokens)[0]

    def ask_many(self, questions: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
        """All questions decoded as one batch against the shared compressed prefix."""
        return answer_many(self.loaded, self.cache, questions, max_new_tokens)

    def stream(self, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Iterator[str]:
        return stream_answer(self.loaded, self.cache, question, max_new_tokens)


class KVStore:
    """A store plus the models and contexts it has loaded (kept up to `max_contexts`, LRU)."""

    def __init__(self, settings: Settings | None = None, max_contexts: int = 8, **overrides: object):
        self.settings = (settings or Settings()).with_overrides(**overrides)
        self.store = ContextStore.open(self.settings)
        self.max_contexts = max_contexts
        self._models: dict[str, LoadedModel] = {}
        self._contexts: OrderedDict[str, LoadedContext] = OrderedDict()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models and presses -----------------------------------------------------------------------

    def model(self, name: str | None = None) -> LoadedModel:
        """Load once per client; later calls return the same model."""
        name = name or self.settings.model
        if name not in self._models:
            self._models[name] = load_model(name, self.settings)
        return self._models[name]

    def press(self, spec: str | None = None, ratio: float | None = None) -> Press:
        """A press from a spec ("kvzip", "kvzip:0.75", "kvzip:0.75+streaming:0.5"); bare names take `ratio`."""
        return parse_press_spec(spec or self.settings.press, self.settings.ratio if ratio is None else ratio)

    # -- ingest -----------------------------------------------------------------------------------

    def ingest_text(
        self, text: str, source: str = "", press: Press | None = None, model: str | None = None
    ) -> list[IngestedPart]:
        """Store a document (several linked parts if it is longer than the model's window)."""
        return ingest_text(
            self.model(model),
            self.store,
            text,
            press or self.press(),
            source=source,
            quant=self.settings.quant,
            blob_format=self.settings.blob_format,
        )

    def ingest_files(self, paths: Iterable[str | Path], press: Press | None = None) -> list[IngestedPart]:
        """Files and folders (recursive); raises DocumentError on the first bad file."""
        return [part for path in discover(paths) for part in self.ingest_text(read_document(path), str(path), press)]

    # -- lookup -----------------------------------------------------------------------------------

    def resolve(self, ref: str) -> list[ContextRecord]:
        """Records for an id, a unique id prefix, or the path of an ingested document (all its parts)."""
        record = self.store.get(ref)
        if record is not None:
            return [record]
        path = Path(ref).expanduser()
        if path.is_file():
            return self._records_for_document(read_document(path), ref)
        if len(ref) >= MIN_ID_PREFIX:
            matches = [cid for cid in self.store.index.ids() if cid.startswith(ref)]
            if len(matches) == 1:
                return [self.store.require(matches[0])]
            if matches:
                raise ContextNotFoundError(f"id prefix {ref!r} is ambiguous ({len(matches)} contexts)")
        raise ContextNotFoundError(f"no stored context for {ref!r} (an id, an id prefix or an ingested file)")

    def _records_for_document(self, text: str, ref: str) -> list[ContextRecord]:
        """Parts stored under the current settings, else the newest parts stored under any."""
        sha = document_sha256(text)
        loaded = self.model()
        found = self.store.find(sha, loaded.fingerprint, self.press().params(), self.settings.quant)
        if not found:  # ingested under other settings: take the newest ones
            newest = next((r for r in self.store.list() if r.document_sha256 == sha), None)
            if newest is not None:
                found = self.store.find(sha, newest.model_fingerprint, newest.press, newest.quant)
        if not found:
            raise ContextNotFoundError(f"{ref} has not been ingested yet: run `kvstore ingest {ref}`")
        return found

    def context(self, ref: str | ContextRecord) -> LoadedContext:
        """Load (or reuse) one stored context; a multi-part document must be addressed by part id."""
        records = [ref] if isinstance(ref, ContextRecord) else self.resolve(ref)
        if len(records) > 1:
            raise ContextNotFoundError(f"{ref} is stored in {len(records)} parts: use contexts() or a part id")
        record = records[0]
        if record.id in self._contexts:
            self._contexts.move_to_end(record.id)
            return self._contexts[record.id]
        loaded = self.model(record.model)
        compressed = self.store.load(record.id, model_fingerprint=loaded.fingerprint)
        context = LoadedContext(record, loaded, CompressedCache(compressed, device=loaded.device))
        self._contexts[record.id] = context
        while len(self._contexts) > self.max_contexts:
            self._contexts.popitem(last=False)
        return context

    def contexts(self, ref: str) -> list[LoadedContext]:
        """Every part of a document (or the single context an id names)."""
        return [self.context(record) for record in self.resolve(ref)]

    # -- questions --------------------------------------------------------------------------------

    def ask(self, ref: str, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
        return self.context(ref).ask(question, max_new_tokens)

    def ask_many(self, ref: str, questions: list[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
        return self.context(ref).ask_many(questions, max_new_tokens)

    def stream(self, ref: str, question: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Iterator[str]:
        return self.context(ref).stream(question, max_new_tokens)

    def cache(self, ref: str) -> CompressedCache:
        """The transformers Cache for callers running `model.generate` themselves.

        Pass the context's token ids followed by the question as input_ids and this cache as
        past_key_values; call `cache.reset()` before reusing it for another question.
        """
        return self.context(ref).cache
