"""Batch jobs: one ingest task per document, grouped under a job id that `kvstore status` can follow.

The job is a Celery group saved in the result backend (`GroupResult.save`/`restore`), plus one small
record naming each task's document, since a queued task has no result yet to say what it is.
Submission sends tasks by name, so the client never imports torch or a model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery, group
from celery.result import GroupResult

from kvstore.config import Compression
from kvstore.decode.answer import Answer
from kvstore.stages import STAGES
from workers.celery import producer
from workers.config import ANSWER_TASK, INGEST_TASK, WorkerSettings

JOB_KEY = "kvstore:jobs:"
# Rough share of a document's work done when a stage starts (for progress bars).
STAGE_DONE = {"queued": 0.0, "started": 0.05, "tokenizing": 0.1, "prefilling": 0.2, "scoring": 0.6, "writing": 0.9}


class JobNotFoundError(LookupError):
    """No job with this id in the result backend (wrong id, other broker, or expired)."""


@dataclass(frozen=True)
class Document:
    """One document to ingest: its text, and where it came from (shown in status and stored as source)."""

    text: str
    source: str


@dataclass
class DocumentStatus:
    source: str
    task_id: str
    state: str  # queued, started, retrying, one of kvstore.stages.STAGES, done, failed
    tokens: int = 0  # the current part's context tokens
    part: int = 0
    parts: int = 0
    tokens_done: int = 0  # of the current stage
    context_ids: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def fraction(self) -> float:
        return 1.0 if self.finished else STAGE_DONE.get(self.state, 0.0)


@dataclass
class JobStatus:
    job_id: str
    documents: list[DocumentStatus]

    @property
    def finished(self) -> bool:
        return all(d.finished for d in self.documents)

    @property
    def done(self) -> int:
        return sum(d.state == "done" for d in self.documents)

    @property
    def failed(self) -> list[DocumentStatus]:
        return [d for d in self.documents if d.state == "failed"]

    @property
    def progress(self) -> float:
        """Documents finished, counting partial progress of running ones."""
        return sum(d.fraction for d in self.documents)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready status for scripts (`kvstore status --json`)."""
        return {
            "job_id": self.job_id,
            "finished": self.finished,
            "done": self.done,
            "failed": len(self.failed),
            "documents": [asdict(d) for d in self.documents],
        }


def submit(app: Celery, documents: Sequence[Document], compression: Compression | None = None) -> str:
    """Enqueue one ingest task per document; the job id (a saved Celery group id).

    `compression` carries only what the submitter chose; the workers' own settings fill the rest.
    """
    if not documents:
        raise ValueError("nothing to submit: no documents")
    chosen = (compression or Compression()).to_dict()
    signatures = [
        app.signature(INGEST_TASK, kwargs={"text": d.text, "source": d.source, "settings": chosen}) for d in documents
    ]
    batch = group(signatures, app=app)
    job: GroupResult = batch.freeze()  # task ids fixed now; apply_async keeps them
    # The record goes in before any task is sent, so `status` never sees a job without its names.
    sources = {"created": time.time(), "sources": [d.source for d in documents]}
    app.backend.client.set(JOB_KEY + job.id, json.dumps(sources), ex=int(WorkerSettings().result_expires))
    job.save(backend=app.backend)
    with producer(app) as publisher:
        batch.apply_async(producer=publisher)
    return job.id


def _document_status(app: Celery, source: str, task_id: str) -> DocumentStatus:
    meta = app.backend.get_task_meta(task_id)
    state, info = meta.get("status", "PENDING"), meta.get("result")
    status = DocumentStatus(source, task_id, "queued")
    if state == "SUCCESS":
        status.state, status.context_ids = "done", list(info or [])
    elif state in ("FAILURE", "REVOKED"):
        status.state = "failed"
        status.error = f"{type(info).__name__}: {info}" if isinstance(info, BaseException) else str(info or state)
    elif state == "RETRY":
        status.state, status.error = "retrying", str(info)
    elif state == "STARTED":
        status.state = "started"
    elif state == "PROGRESS" and isinstance(info, dict):
        stage = str(info.get("stage", "started"))
        status.state = stage if stage in STAGES else "started"
        status.tokens, status.part = int(info.get("tokens") or 0), int(info.get("part") or 0)
        status.parts, status.tokens_done = int(info.get("parts") or 0), int(info.get("done") or 0)
    return status


def job_status(app: Celery, job_id: str) -> JobStatus:
    """Per-document state of a job, in submission order."""
    job = GroupResult.restore(job_id, app=app, backend=app.backend)
    raw = app.backend.client.get(JOB_KEY + job_id)
    if job is None or raw is None:
        raise JobNotFoundError(f"no job {job_id!r} (unknown id, another broker, or older than its expiry)")
    sources = json.loads(raw)["sources"]
    return JobStatus(job_id, [_document_status(app, s, r.id) for s, r in zip(sources, job.results, strict=True)])


def wait(
    app: Celery,
    job_id: str,
    timeout: float | None = None,
    poll_s: float = 0.5,
    on_update: Callable[[JobStatus], Any] | None = None,
) -> JobStatus:
    """Poll until every document is done or failed; TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = job_status(app, job_id)
        if on_update is not None:
            on_update(status)
        if status.finished:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s ({status.done} done)")
        time.sleep(poll_s)


def ask(
    app: Celery,
    refs: str | Sequence[str],
    questions: Sequence[str],
    options: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    **generation: Any,
) -> list[Answer]:
    """Answer questions on a worker of the answer queue, from one stored context or several composed.

    Generation options come as a JSON-safe mapping or as keywords, like the Python client's
    (max_new_tokens, temperature, top_p, top_k, do_sample, stop, seed); the worker checks them. Each
    answer is an `Answer`: a str that also knows its contexts, token counts and finish reason.
    """
    if options is not None and generation:
        raise TypeError("pass generation options either as a mapping or as keywords, not both")
    ref = refs if isinstance(refs, str) else list(refs)
    chosen = dict(options or generation)
    with producer(app) as publisher:
        result = app.send_task(ANSWER_TASK, args=[ref, list(questions), chosen], producer=publisher)
    return [Answer.from_dict(answer) for answer in result.get(timeout=timeout)]
