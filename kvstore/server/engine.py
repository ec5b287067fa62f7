"""Two threads run the model for the HTTP server: one prepares requests, one decodes, one step at a time.

Requests become `Job`s. The preparer thread resolves each job's contexts and loads and composes
them through the client's LRU (or retrieves them: BM25), one job at a time in arrival order, and
hands each prepared job to the engine thread. The engine thread only decodes (it tokenizes a
batch's questions when the batch starts): it groups the jobs waiting for the same (composed)
context and the same generation options into one batch (the shared prefix decoded once for all of
them), then advances every running batch by ONE decode step in turn. So running batches never wait
for a cold context's blob read, validation and composition (the two threads share only the CPU),
and a prepared request for another context waits at most one step of each running batch, never a
whole generation. When idle, the engine gathers jobs until none has arrived for `gather_s` (at
most `max_gather_s`), so questions that arrive together decode as one batch. If the decoding
thread ever fails, every job it holds or will be given is failed with that error (never left
waiting) and `/healthz` reports it.

A job for a context whose batch is already running waits for that batch to finish (one cache per
context holds its suffix), then joins the next batch with everything that arrived meanwhile. A
sampled job with a seed decodes in a batch of its own: its draws then depend on its seed alone.
The client's LRUs of loaded contexts and compositions are not thread-safe: whatever uses them (the
preparer, a delete) holds `Engine.lock`. A running batch keeps its own reference to its context,
so evicting or deleting that context meanwhile does not disturb it. Both threads may use the model's
tokenizer at once: they only encode and decode, which never changes its settings. Results and
streamed pieces go back to the asyncio side through thread-safe callbacks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvstore.client import KVStore, LoadedContext
from kvstore.decode.generation import GenerationOptions, Row, TextStream, decode_rows, finished_answer

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Job:
    """One question to answer, and where its result goes (called on the engine or preparer thread)."""

    question: str
    options: GenerationOptions
    refs: list[str] | None = None  # contexts to compose, in order; None: retrieve
    retrieve: int = 0  # top-k to retrieve when refs is None
    on_piece: Callable[[str], None] | None = None  # streamed text
    on_done: Callable[[Any, BaseException | None], None] = lambda answer, error: None
    context: LoadedContext | None = None

    @property
    def alone(self) -> bool:
        """Whether it must decode in a batch of its own (seeded sampling: batch-mates would shift its draws)."""
        return self.options.sampling and self.options.seed is not None


@dataclass
class _Batch:
    """Jobs decoding together against one context; its generator yields the rows after each step."""

    context: LoadedContext
    jobs: list[Job]
    steps: Iterator[list[Row]]
    streams: list[TextStream]
    rows: list[Row] = field(default_factory=list)


class Engine:
    """Owns a KVStore (and its model): a preparer thread and a decoding thread; see the module docstring."""

    def __init__(self, make_client: Callable[[], KVStore], gather_s: float = 0.01, max_gather_s: float = 0.2):
        self._make_client = make_client
        self.gather_s, self.max_gather_s = gather_s, max_gather_s
        self.client: KVStore | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.lock = threading.Lock()  # the client's LRU, loads, compositions and deletes: one user at a time
        self.stats = {"batches": 0, "questions": 0, "largest_batch": 0}  # how much sharing happened
        self._submitted: queue.Queue[Job | None] = queue.Queue()
        self._prepared: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kvstore-engine", daemon=True)
        self._preparer = threading.Thread(target=self._prepare_all, name="kvstore-prepare", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._submitted.put(None)
        self._prepared.put(None)
        for thread in (self._preparer, self._thread):
            if thread.is_alive():
                thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._submitted.put(job)

    def locked(self, work: Callable[[KVStore], T]) -> T:
        """`work(client)` under the client's lock (blocking: call it from a worker thread)."""
        with self.lock:
            return work(self.client)

    # -- the preparer thread ----------------------------------------------------------------------

    def _prepare_all(self) -> None:
        while (job := self._submitted.get()) is not None:
            try:
                if self.error is not None:
                    raise RuntimeError(f"the server cannot answer: {self.error}")
                with self.lock:
                    job.context = self._context(job)
            except BaseException as exc:
                _notify(job, None, exc)
                continue
            self._prepared.put(job)

    def _context(self, job: Job) -> LoadedContext:
        if job.refs is None:
            return self.client.prepare_retrieved(job.question, job.retrieve, job.options)
        return self.client.prepare(job.refs, [job.question], job.options)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.client = self._make_client()
            self.client.model()  # the model loads once, before any request is served
        except BaseException as exc:
            self.error = exc
            log.exception("the model could not be loaded")
            self.ready.set()
            return
        self._preparer.start()
        self.ready.set()
        waiting: list[Job] = []
        running: list[_Batch] = []
        try:
            while self._take(waiting, idle=not running and not waiting):
                self._start_batches(waiting, running)
                for batch in list(running):
                    self._step(batch, running)
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the decoding thread stopped")
            self.error = exc
        finally:
            stopped = self.error or RuntimeError("the server is shutting down")
            for job in [*waiting, *(job for batch in running for job in batch.jobs), *_drain(self._prepared)]:
                _notify(job, None, stopped)

    def _take(self, waiting: list[Job], idle: bool) -> bool:
        """Move prepared jobs into `waiting`; False to stop. Busy: whatever is there now. Idle: wait for
        one, then gather until none arrives for `gather_s` (at most `max_gather_s` in all)."""
        if not idle:
            while True:
                try:
                    job = self._prepared.get_nowait()
                except queue.Empty:
                    return True
                if job is None:
                    return False
                waiting.append(job)
        job = self._prepared.get()
        deadline = time.monotonic() + self.max_gather_s
        while job is not None:
            waiting.append(job)
            wait = min(self.gather_s, deadline - time.monotonic())
            if wait <= 0:
                return True
            try:
                job = self._prepared.get(timeout=wait)
            except queue.Empty:
                return True
        return False

    def _start_batches(self, waiting: list[Job], running: list[_Batch]) -> None:
        busy = {id(batch.context) for batch in running}
        groups: dict[tuple[int, GenerationOptions, int], list[Job]] = {}
        for job in waiting:
            if id(job.context) not in busy:
                groups.setdefault((id(job.context), job.options, id(job) if job.alone else 0), []).append(job)
        for (context_key, options, _), jobs in groups.items():
            if context_key in busy:
                continue  # one batch per context at a time: the rest wait for the next one
            busy.add(context_key)
            for job in jobs:
                waiting.remove(job)
            context = jobs[0].context
            steps = decode_rows(context.loaded, context.cache, [j.question for j in jobs], options)
            streams = [TextStream(context.loaded, options) for _ in jobs]
            running.append(_Batch(context, jobs, steps, streams))
            self.stats["batches"] += 1
            self.stats["questions"] += len(jobs)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))

    def _step(self, batch: _Batch, running: list[_Batch]) -> None:
        try:
            batch.rows = next(batch.steps)
        except StopIteration:
            self._finish(batch, running, None)
            return
        except BaseException as exc:
            self._finish(batch, running, exc)
            return
        for job, stream, row in zip(batch.jobs, batch.streams, batch.rows, strict=True):
            if job.on_piece is not None and (piece := stream.update(row)):
                job.on_piece(piece)

    def _finish(self, batch: _Batch, running: list[_Batch], error: BaseException | None) -> None:
        running.remove(batch)
        for job, stream, row in zip(batch.jobs, batch.streams, batch.rows or [None] * len(batch.jobs), strict=True):
            if error is not None or row is None:
                _notify(job, None, error or RuntimeError("no token was decoded"))
                continue
            if job.on_piece is not None and (piece := stream.finish(row)):
                job.on_piece(piece)
            _notify(job, finished_answer(batch.context.loaded, row, job.options, batch.context.ids), None)


def _notify(job: Job, answer: Any, error: BaseException | None) -> None:
    """Hand a job its result; a caller that went away (its event loop closed) is only logged."""
    try:
        job.on_done(answer, error)
    except Exception:
        log.exception("a finished request could not be told its result")


def _drain(jobs: queue.Queue[Job | None]) -> list[Job]:
    """Everything still queued (the stop sentinel dropped)."""
    drained = []
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return drained
        if job is not None:
            drained.append(job)
