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
from typing import Any

from transformers import GenerationConfig

from kvstore.config import Settings
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GREEDY, Answer, GenerationOptions, answer_many, stream_answer
from kvstore.engine.models import LoadedModel, load_model
from kvstore.ingest import IngestedPart, ingest_text
from kvstore.presses import parse_press_spec
from kvstore.presses.base import Press
from kvstore.refs import resolve
from kvstore.stages import StageReport
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextNotFoundError, ContextStore
from kvstore.text.documents import discover, read_document

Options = GenerationOptions | GenerationConfig | None


def generation_options(options: Options = None, **fields: Any) -> GenerationOptions:
    """One GenerationOptions from a GenerationOptions, a transformers GenerationConfig, or keyword fields."""
    if options is not None and fields:
        raise TypeError("pass generation options either as an object or as keywords, not both")
    if isinstance(options, GenerationConfig):
        return GenerationOptions.from_config(options)
    return options or (GenerationOptions(**fields) if fields else GREEDY)


@dataclass
class LoadedContext:
    """A stored context in memory, ready for questions."""

    record: ContextRecord
    loaded: LoadedModel
    cache: CompressedCache

    def ask(self, question: str, options: Options = None, **generation: Any) -> Answer:
        """One answer, decoded against the compressed prefix (greedy unless options say otherwise)."""
        return self.ask_many([question], options, **generation)[0]

    def ask_many(self, questions: list[str], options: Options = None, **generation: Any) -> list[Answer]:
        """All questions decoded as one batch against the shared compressed prefix."""
        chosen = generation_options(options, **generation)
        return answer_many(self.loaded, self.cache, questions, chosen, contexts=(self.record.id,))

    def stream(self, question: str, options: Options = None, **generation: Any) -> Iterator[str]:
        """The answer's text, piece by piece as it is decoded."""
        return stream_answer(self.loaded, self.cache, question, generation_options(options, **generation))


class KVStore:
    """A store plus the models and contexts it has loaded (kept up to `max_contexts`, LRU).

    `settings` is used whole; keyword fields (home=..., ratio=..., ...) build one from the
    environment instead, each validated by `Settings`.
    """

    def __init__(self, settings: Settings | None = None, *, max_contexts: int = 8, **fields: Any):
        if settings is not None and fields:
            raise TypeError("pass either a Settings object or keyword settings, not both")
        self.settings = settings or Settings().with_overrides(**fields)
        self.store = ContextStore.open(self.settings)
        self.max_contexts = max_contexts
        self._models: dict[str, LoadedModel] = {}
        self._contexts: OrderedDict[str, LoadedContext] = OrderedDict()

    def close(self) -> None:
        """Release the index connection (an embedded Redis stops when its last client leaves)."""
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
        self,
        text: str,
        source: str = "",
        press: Press | None = None,
        model: str | None = None,
        report: StageReport | None = None,
    ) -> list[IngestedPart]:
        """Store a document (several linked parts if it is longer than the model's window).

        `report` hears each part's stages and tokens done (see `kvstore.stages.StageReport`).
        """
        return ingest_text(
            self.model(model),
            self.store,
            text,
            press or self.press(),
            source=source,
            quant=self.settings.quant,
            blob_format=self.settings.blob_format,
            report=report,
        )

    def ingest_files(self, paths: Iterable[str | Path], press: Press | None = None) -> list[IngestedPart]:
        """Files and folders (recursive), read exactly as `kvstore ingest` reads them; raises DocumentError
        on the first bad file."""
        limit = self.settings.max_document_bytes
        return [
            part for path in discover(paths) for part in self.ingest_text(read_document(path, limit), str(path), press)
        ]

    # -- lookup -----------------------------------------------------------------------------------

    def _stored_here(self, record: ContextRecord) -> bool:
        """Whether a record was stored under this client's model, press and quantization."""
        same_model = record.model_fingerprint == self.model().fingerprint
        return same_model and record.press == self.press().params() and record.quant == self.settings.quant

    def resolve(self, ref: str) -> list[ContextRecord]:
        """Records for an id, a unique id prefix, or the path of an ingested document (all its parts).

        A document stored under several settings resolves to the version stored under this client's
        settings, else to the newest one.
        """
        return resolve(self.store, ref, self._stored_here)

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

    def ask(self, ref: str, question: str, options: Options = None, **generation: Any) -> Answer:
        """One answer from a stored context (an Answer is a str that also names its contexts and token counts).

        Generation options come as a GenerationOptions, a transformers GenerationConfig, or keywords:
        `kv.ask(ref, q, max_new_tokens=32, temperature=0.7, stop=["\\n"])`.
        """
        return self.context(ref).ask(question, options, **generation)

    def ask_many(self, ref: str, questions: list[str], options: Options = None, **generation: Any) -> list[Answer]:
        """Several answers from one stored context, decoded as one batch against its shared prefix."""
        return self.context(ref).ask_many(questions, options, **generation)

    def stream(self, ref: str, question: str, options: Options = None, **generation: Any) -> Iterator[str]:
        """The answer's text piece by piece as it is decoded."""
        return self.context(ref).stream(question, options, **generation)

    def cache(self, ref: str) -> CompressedCache:
        """The transformers Cache for callers running `model.generate` themselves.

        Pass the context's token ids followed by the question as input_ids and this cache as
        `cache=`; call `cache.reset()` before reusing it for another question.
        """
        return self.context(ref).cache
