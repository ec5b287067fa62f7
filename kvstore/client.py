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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from kvstore.config import Settings
from kvstore.decode.answer import Source
from kvstore.decode.cache import CompressedCache
from kvstore.decode.compose import compose
from kvstore.decode.generation import GREEDY, Answer, GenerationOptions, answer_many, stream_answer
from kvstore.engine.models import LoadedModel, load_model
from kvstore.engine.rotary import PositionError
from kvstore.errors import InputError
from kvstore.ingest import IngestedPart, ingest_text
from kvstore.presses import parse_press_spec
from kvstore.presses.base import Press
from kvstore.refs import resolve
from kvstore.search import ContextSearch, SearchHit
from kvstore.stages import StageReport
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextNotFoundError, ContextStore
from kvstore.text.documents import discover, read_document

Options = GenerationOptions | GenerationConfig | None
Refs = str | ContextRecord | Sequence[str | ContextRecord]


def generation_options(options: Options = None, **fields: Any) -> GenerationOptions:
    """One GenerationOptions from a GenerationOptions, a transformers GenerationConfig, or keyword fields."""
    if options is not None and fields:
        raise TypeError("pass generation options either as an object or as keywords, not both")
    if isinstance(options, GenerationConfig):
        return GenerationOptions.from_config(options)
    return options or (GenerationOptions(**fields) if fields else GREEDY)


@dataclass
class LoadedContext:
    """A stored context (or several, composed) in memory, ready for questions."""

    record: ContextRecord  # the (first) context's record
    loaded: LoadedModel
    cache: CompressedCache
    records: tuple[ContextRecord, ...] = ()  # every context in the prompt, in order (default: just `record`)

    def __post_init__(self) -> None:
        self.records = self.records or (self.record,)

    @property
    def ids(self) -> tuple[str, ...]:
        """Ids of the contexts in the prompt, in order."""
        return tuple(r.id for r in self.records)

    @property
    def sources(self) -> tuple[Source, ...]:
        """The contexts in the prompt as an answer cites them: document and part."""
        return tuple(Source(r.id, r.source, r.part, r.parts) for r in self.records)

    def ask(self, question: str, options: Options = None, **generation: Any) -> Answer:
        """One answer, decoded against the compressed prefix (greedy unless options say otherwise)."""
        return self.ask_many([question], options, **generation)[0]

    def ask_many(self, questions: list[str], options: Options = None, **generation: Any) -> list[Answer]:
        """All questions decoded as one batch against the shared compressed prefix."""
        chosen = generation_options(options, **generation)
        answers = answer_many(self.loaded, self.cache, questions, chosen, contexts=self.ids)
        return [answer.cited(self.sources) for answer in answers]

    def stream(self, question: str, options: Options = None, **generation: Any) -> Iterator[str]:
        """The answer's text, piece by piece as it is decoded."""
        return stream_answer(self.loaded, self.cache, question, generation_options(options, **generation))


class KVStore:
    """A store plus the models and contexts it has loaded (kept up to `max_contexts`, LRU).

    `settings` is used whole; keyword fields (home=..., ratio=..., ...) build one from the
    environment instead, each validated by `Settings`.
    """

    def __init__(
        self, settings: Settings | None = None, *, max_contexts: int = 8, untrusted_refs: bool = False, **fields: Any
    ):
        """Open the store now, so a wrong home or Redis URL fails here; models load on first use.

        `max_contexts` bounds the contexts kept loaded (each holds its K/V in memory). With
        `untrusted_refs=True` (a server's remote callers, a worker's task messages) refs are ids and
        prefixes only, and only contexts stored by this client's own model are answered: a caller, or
        a record planted in a shared index, must never make it read local files or load another model.
        """
        if settings is not None and fields:
            raise TypeError("pass either a Settings object or keyword settings, not both")
        self.settings = settings or Settings().with_overrides(**fields)
        self.store = ContextStore.open(self.settings)
        self.max_contexts = max_contexts
        self.untrusted_refs = untrusted_refs
        self._models: dict[str, LoadedModel] = {}
        self._contexts: OrderedDict[str, LoadedContext] = OrderedDict()
        self._compositions: OrderedDict[tuple[str, ...], LoadedContext] = OrderedDict()
        self.searcher = ContextSearch(self.store)

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
        return resolve(self.store, ref, self._stored_here, paths=not self.untrusted_refs)

    def records(self, refs: Refs) -> list[ContextRecord]:
        """Every record the refs name, in order (a document path names all its parts); duplicates dropped."""
        items = [refs] if isinstance(refs, str | ContextRecord) else list(refs)
        if not items:
            raise InputError("no contexts given: name at least one id, id prefix or document")
        found: dict[str, ContextRecord] = {}
        for item in items:
            for record in [item] if isinstance(item, ContextRecord) else self.resolve(item):
                found.setdefault(record.id, record)
        records = list(found.values())
        if self.untrusted_refs:
            served = self.model()
            for record in records:
                if record.model_fingerprint != served.fingerprint:
                    raise InputError(
                        f"context {record.id[:12]} was stored by model {record.model!r} "
                        f"({record.model_fingerprint}); only {served.name!r} ({served.fingerprint}) is served here"
                    )
        models = {(r.model, r.model_fingerprint) for r in records}
        if len(models) > 1:
            names = ", ".join(sorted(f"{name} ({fp})" for name, fp in models))
            raise InputError(f"these contexts were stored by different models ({names}): compose one model's only")
        return records

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
        compressed = self.store.load(record.id, loaded.fingerprint, loaded.kv_shape)
        context = LoadedContext(record, loaded, CompressedCache.for_model(compressed, loaded, self.settings.kernel))
        self._contexts[record.id] = context
        while len(self._contexts) > self.max_contexts:
            self._contexts.popitem(last=False)
        return context

    def delete(self, ref: str) -> list[ContextRecord]:
        """Remove the contexts a ref names from the store, and from this client's memory."""
        records = self.resolve(ref)
        for record in records:
            self.store.delete(record.id)
            self._contexts.pop(record.id, None)
            for key in [k for k in self._compositions if record.id in k]:
                del self._compositions[key]
        return records

    def contexts(self, ref: str) -> list[LoadedContext]:
        """Every part of a document (or the single context an id names)."""
        return [self.context(record) for record in self.resolve(ref)]

    def _composed(self, records: list[ContextRecord], reserve: int) -> LoadedContext:
        """One context for several records: the parts from the LRU, composed once and kept (LRU too)."""
        if len(records) == 1:
            return self.context(records[0])
        key = tuple(r.id for r in records)
        if key in self._compositions:
            self._compositions.move_to_end(key)
            return self._compositions[key]
        parts = [self.context(r) for r in records]
        loaded = parts[0].loaded
        composed = compose(loaded, [p.cache.compressed for p in parts], reserve)
        cache = CompressedCache.for_model(composed, loaded, self.settings.kernel)
        context = LoadedContext(records[0], loaded, cache, tuple(records))
        self._compositions[key] = context
        while len(self._compositions) > max(1, self.max_contexts // 2):
            self._compositions.popitem(last=False)
        return context

    def _fitting(self, records: list[ContextRecord], question: str, reserve: int, select: bool) -> list[ContextRecord]:
        """Records that fit the window with `reserve` tokens to spare: all when they do; else, when
        `select` (one document named), its parts most relevant to `question` (BM25) in document order.
        Contexts named one by one are never dropped silently: the composition refuses them instead."""
        window = self._window(records[0])
        if composed_tokens(records) + reserve <= window or not select:
            return records
        order = {r.id: i for i, r in enumerate(records)}
        ranked = self.searcher.search(question, k=len(records), where=lambda r: r.id in order)
        chosen: list[ContextRecord] = []
        for hit in ranked:
            if composed_tokens([*chosen, hit.record]) + reserve <= window:
                chosen.append(hit.record)
        if not chosen:
            raise PositionError(
                f"no stored part fits the model's window of {window:,} tokens with {reserve:,} to spare "
                "for the question and answer"
            )
        return sorted(chosen, key=lambda r: order[r.id])

    def _window(self, record: ContextRecord) -> int:
        return int(getattr(self.model(record.model).model.config, "max_position_embeddings", 1 << 30))

    def prepare(self, refs: Refs, questions: list[str], options: Options = None) -> LoadedContext:
        """The (composed) context that answers `questions` from `refs`, loaded and ready (`.ids` names
        its contexts): when the refs are longer than the window, the parts most relevant to the (first)
        question that fit."""
        options = generation_options(options)
        records = self.records(refs)
        loaded = self.model(records[0].model)
        longest = max((len(loaded.frame.question_ids(q)) for q in questions), default=0)
        reserve = longest + options.max_new_tokens
        one_ref = isinstance(refs, str | ContextRecord) or len(refs) == 1
        chosen = self._fitting(records, questions[0] if questions else "", reserve, select=one_ref)
        return self._composed(chosen, reserve)

    # -- questions --------------------------------------------------------------------------------

    def ask(self, refs: Refs, question: str, options: Options = None, **generation: Any) -> Answer:
        """One answer from one or several stored contexts (a list composes them, in order, into one prompt).

        An Answer is a str that also names the contexts it was decoded from and its token counts.
        Generation options come as a GenerationOptions, a transformers GenerationConfig, or keywords:
        `kv.ask([id_a, id_b], q, max_new_tokens=32, temperature=0.7, stop=["\\n"])`.
        """
        return self.ask_many(refs, [question], options, **generation)[0]

    def ask_many(self, refs: Refs, questions: list[str], options: Options = None, **generation: Any) -> list[Answer]:
        """Several answers from the same (composed) contexts, decoded as one batch against the shared prefix."""
        chosen = generation_options(options, **generation)
        return self.prepare(refs, questions, chosen).ask_many(questions, chosen)

    def stream(self, refs: Refs, question: str, options: Options = None, **generation: Any) -> Iterator[str]:
        """The answer's text piece by piece as it is decoded."""
        chosen = generation_options(options, **generation)
        return self.prepare(refs, [question], chosen).stream(question, chosen)

    def cache(self, refs: Refs) -> CompressedCache:
        """The transformers Cache of one context (or of several, composed) for callers running `generate`.

        Pass `cache.compressed.token_ids` followed by the question as input_ids and this cache as
        `cache=`; call `cache.reset()` before reusing it for another question.
        """
        return self._composed(self.records(refs), 0).cache

    # -- retrieval --------------------------------------------------------------------------------

    def search(self, question: str, k: int = 4) -> list[SearchHit]:
        """The stored contexts (document parts included) of this client's model that best match `question`."""
        name = self.settings.model
        return self.searcher.search(question, k, where=lambda r: r.model == name)

    def prepare_retrieved(self, question: str, k: int = 4, options: Options = None) -> LoadedContext:
        """The top-`k` contexts for `question` that fit the window together, composed best match last."""
        return self._retrieved(question, k, generation_options(options))[0]

    def _retrieved(self, question: str, k: int, options: GenerationOptions) -> tuple[LoadedContext, list[SearchHit]]:
        """`prepare_retrieved`'s context, and the hits it composes, in prompt order: the best match last,
        next to the question (a composed prompt is answered mostly from its last context: BENCHMARKS §7)."""
        hits = self.search(question, k)
        if not hits:
            raise ContextNotFoundError("no stored context of this model matches the question: ingest documents first")
        reserve = len(self.model().frame.question_ids(question)) + options.max_new_tokens
        window = self._window(hits[0].record)
        used: list[SearchHit] = []
        for hit in hits:
            if composed_tokens([*(h.record for h in used), hit.record]) + reserve <= window:
                used.append(hit)
        if not used:
            raise PositionError(f"no retrieved context fits the model's window of {window:,} tokens with the question")
        used.reverse()
        return self._composed([h.record for h in used], reserve), used

    def retrieve_and_ask(self, question: str, k: int = 4, options: Options = None, **generation: Any) -> Answer:
        """RAG in one call: the top-`k` contexts that fit the window, composed best match last, one answer.

        `answer.sources` cites the contexts used, in prompt order (the best match last): id, document,
        part and BM25 score.
        """
        chosen = generation_options(options, **generation)
        context, used = self._retrieved(question, k, chosen)
        return context.ask_many([question], chosen)[0].cited(used)


def composed_tokens(records: list[ContextRecord]) -> int:
    """Context tokens of these records composed: one template head plus every document."""
    return records[0].prefix_length + sum(r.original_length - r.prefix_length for r in records) if records else 0
