"""Document -> tokens -> (dedupe) -> prefill -> score -> compress -> store, one part at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.compress import compress
from kvstore.engine.models import LoadedModel
from kvstore.errors import UnavailableError
from kvstore.kv.compressed import CompressedKV
from kvstore.presses.base import Press
from kvstore.stages import StageReport
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import WRITER_WAIT_S, ContextMeta, ContextStore, context_id, document_sha256
from kvstore.text.documents import DocumentError
from kvstore.text.parts import split_tokens

# Room left in the model's window for the question and the answer.
ANSWER_RESERVE_TOKENS = 512


@dataclass
class IngestedPart:
    record: ContextRecord
    created: bool  # False: an identical context was already stored (nothing recomputed)


def max_document_tokens(loaded: LoadedModel) -> int:
    """Longest document part that still leaves room for the template, a question and an answer."""
    window = getattr(loaded.model.config, "max_position_embeddings", 8192)
    frame = loaded.frame
    return max(64, window - len(frame.head_ids) - ANSWER_RESERVE_TOKENS)


def ingest_text(
    loaded: LoadedModel,
    store: ContextStore,
    text: str,
    press: Press,
    source: str = "",
    quant: str | None = None,
    blob_format: str | None = None,
    max_tokens: int | None = None,
    report: StageReport | None = None,
    on_part: Callable[[IngestedPart], None] | None = None,
) -> list[IngestedPart]:
    """Store `text` as one context, or several linked parts when it exceeds the model's window.

    `on_part` hears each part as soon as it is stored, so a caller can undo the parts of a document
    whose later part failed (the HTTP server stores nothing on a failed request). A part that fails
    leaves nothing of its own behind, not even its search text.
    """
    text = text.strip()  # as `read_document` returns it: the same file is the same document either way
    if not text:
        raise DocumentError(f"{source or 'text'}: the document is empty")
    frame = loaded.frame
    limit = max_tokens or max_document_tokens(loaded)
    parts = split_tokens(text, loaded.tokenizer, limit)
    if not parts:
        raise DocumentError(f"{source or 'text'}: the document is empty after tokenization")
    doc_sha = document_sha256(text)
    quant = quant or store.quant
    results = []
    for number, part in enumerate(parts):
        meta = ContextMeta.for_model(
            loaded,
            press.params(),
            source=source,
            document_sha256=doc_sha,
            document_id=doc_sha[:16],
            part=number,
            parts=len(parts),
        )
        token_ids = frame.context_ids(part.ids)
        cid = context_id(loaded.fingerprint, token_ids, meta.press, quant)

        def on_stage(stage: str, done: int, tokens: int = token_ids.shape[1], part_number: int = number) -> None:
            if report is not None:
                report(stage, tokens=tokens, part=part_number, parts=len(parts), done=done)

        existing = store.get(cid)
        if existing is not None and store.intact(existing, loaded.kv_shape):  # else put repairs it
            with store.texts.writing(cid, WRITER_WAIT_S):
                store.texts.put(cid, part.text)  # a text lost meanwhile comes back
            stored = IngestedPart(existing, False)
        else:
            compressed = compress(loaded, part.ids, press, on_stage)
            on_stage("writing", 0)
            stored = _commit(store, cid, part.text, compressed, meta, quant, blob_format)
        results.append(stored)
        if on_part is not None:
            on_part(stored)
    return results


def _commit(
    store: ContextStore,
    cid: str,
    text: str,
    compressed: CompressedKV,
    meta: ContextMeta,
    quant: str,
    blob_format: str | None,
) -> IngestedPart:
    """Write a part's search text, then its blob and record, under the text's lease (gc leaves the text
    alone until the record commits; `kvstore.storage.texts`). The text goes first, so search never
    misses a stored part; if the put fails, the text goes too (unless a record of the id exists)."""
    with store.texts.writing(cid, WRITER_WAIT_S):
        store.texts.put(cid, text)
        try:
            record, created = store.put(compressed, meta, quant=quant, blob_format=blob_format)
        except BaseException:
            with contextlib.suppress(UnavailableError):  # the index is gone: gc removes the text later
                if store.get(cid) is None:
                    store.texts.delete(cid)
            raise
    return IngestedPart(record, created)
