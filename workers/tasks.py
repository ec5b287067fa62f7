"""The tasks: thin calls into kvstore, so the queue adds delivery guarantees and progress, not logic.

Delivery: late acks and reject-on-worker-lost (app config) mean a task whose worker dies is run
again; that is safe because ingest is idempotent by content-addressed id (a stored part is found
before any prefill) and the store commits a record only after its blob is complete. A task whose
worker died KVSTORE_MAX_DELIVERIES times in a row fails instead (`workers.deliveries`).
Retries with exponential backoff cover transient Redis trouble; bad input fails at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
from celery import Task

from kvstore.config import Compression
from kvstore.decode.generation import GenerationOptions
from kvstore.ingest import ingest_text
from kvstore.storage.index import IndexUnavailableError
from kvstore.text.documents import DocumentError, read_document
from workers import runtime
from workers.celery import app
from workers.config import ANSWER_TASK, INGEST_TASK, WorkerSettings, soft_limit
from workers.deliveries import DeliveryCappedTask

log = logging.getLogger(__name__)
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, IndexUnavailableError)
PROGRESS = "PROGRESS"

_limits = WorkerSettings()
_retry: dict[str, Any] = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 8,
}


def _task(name: str, time_limit: float) -> Any:
    """The options every kvstore task shares: bound, delivery-capped, time-limited, retried on Redis trouble."""
    return app.task(
        bind=True,
        base=DeliveryCappedTask,
        max_deliveries=_limits.max_deliveries,
        name=name,
        time_limit=time_limit,
        soft_time_limit=soft_limit(time_limit),
        **_retry,
    )


def read_allowed(path: str) -> str:
    """A document named by path, only from under KVSTORE_FILES_ROOT: anyone who can reach the broker can
    send a task, and must not make a worker read (or block on) an arbitrary file."""
    root = os.environ.get("KVSTORE_FILES_ROOT")
    if not root:
        raise DocumentError("this worker reads no paths (set KVSTORE_FILES_ROOT to allow a folder): send the text")
    base, target = Path(root).resolve(), Path(root, path).resolve()
    if not target.is_relative_to(base):
        raise DocumentError(f"{path}: outside the folder this worker may read ({base})")
    try:
        return read_document(target)
    except OSError as exc:  # a path names a file on the worker's disk, which may not have it
        raise DocumentError(f"{path}: cannot read it on this worker ({exc.strerror or exc})") from exc


def _reporter(task: Task, source: str) -> Any:
    def report(stage: str, **meta: object) -> None:
        if task.request.id is not None and not task.request.is_eager:
            task.update_state(state=PROGRESS, meta={"stage": stage, "source": source, **meta})

    return report


@_task(INGEST_TASK, _limits.ingest_time_limit)
def ingest_document(
    self: Task,
    text: str | None = None,
    path: str | None = None,
    source: str = "",
    settings: Mapping[str, object] | None = None,
) -> list[str]:
    """Compress and store one document (text, or a path readable by the worker); its context ids."""
    compression = Compression.from_dict(settings)  # per-document choices; where the store lives is the worker's
    if text is None:
        if not path:
            raise DocumentError("ingest_document needs `text` or `path`")
        text = read_allowed(path)
        source = source or path
    log.info("ingesting %s (%d characters)", source or "text", len(text))
    report = _reporter(self, source)
    report("tokenizing", tokens=0, part=0, parts=0, done=0)
    kv = runtime.client()
    chosen = kv.settings.with_compression(compression)
    press = kv.press(chosen.press, chosen.ratio)  # a name or a spec such as kvzip:0.75+streaming:0.5
    parts = ingest_text(
        kv.model(chosen.model),
        kv.store,
        text,
        press,
        source=source,
        quant=chosen.quant,
        blob_format=chosen.blob_format,
        report=report,
    )
    return [part.record.id for part in parts]


@_task(ANSWER_TASK, _limits.answer_time_limit)
def answer_questions(
    self: Task, ref: str | list[str], questions: list[str], options: Mapping[str, object] | None = None
) -> list[dict[str, Any]]:
    """Answer a batch of questions from one stored context, or from several composed into one prompt.

    `ref` is an id or a unique prefix, or a list of them (composed in that order), of a context stored
    by this worker's model: a task message is untrusted, so it never names a path the worker would
    read, nor makes it load another model.
    `options` are the generation options as JSON (`GenerationOptions.from_dict`: max_new_tokens,
    temperature, top_p, top_k, do_sample, stop, seed), checked before any model work. Each answer comes
    back as JSON (`Answer.to_dict`): its text, the contexts used, token counts and finish reason.
    """
    if isinstance(questions, str) or not isinstance(questions, list | tuple):
        raise DocumentError("questions must be a list of strings, not a single string")
    if not all(isinstance(q, str) and q.strip() for q in questions):
        raise DocumentError("every question must be a non-empty string")
    generation = GenerationOptions.from_dict(options)
    if not questions:
        return []
    kv = runtime.client()
    return [answer.to_dict() for answer in kv.ask_many(ref, list(questions), generation)]
