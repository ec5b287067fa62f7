"""The one thread that runs the model for the HTTP server, one decode step at a time.

Requests become `Job`s on a queue. The engine resolves each job's contexts (loading and composing
them through the client's LRU), groups the jobs waiting for the same (composed) context and the
same generation options into one batch (the shared prefix decoded once for all of them), and then
advances every running batch by ONE decode step in turn. So a request for another context waits at
most one step of each running batch, never a whole generation. A job for a context whose batch is
already running waits for that batch to finish (one cache per context holds its suffix), then
joins the next batch with everything that arrived meanwhile. Results and streamed pieces go back
to the asyncio side through thread-safe callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvstore.client import KVStore, LoadedContext
from kvstore.decode.generation import GenerationOptions, Row, TextStream, decode_rows, finished_answer

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One question to answer, and where its result goes (called on the engine thread)."""

    question: str
    options: GenerationOptions
    refs: list[str] | None = None  # contexts to compose, in order; None: retrieve
    retrieve: int = 0  # top-k to retrieve when refs is None
    on_piece: Callable[[str], None] | None = None  # streamed text
    on_done: Callable[[Any, BaseException | None], None] = lambda answer, error: None
    context: LoadedContext | None = None


@dataclass
class _Batch:
    """Jobs decoding together against one context; its generator yields the rows after each step."""

    context: LoadedContext
    jobs: list[Job]
    steps: Iterator[list[Row]]
    streams: list[TextStream]
    rows: list[Row] = field(default_factory=list)


class Engine:
    """Owns a KVStore (and its model) on one thread; see the module docstring."""

    def __init__(self, make_client: Callable[[], KVStore], gather_s: float = 0.01):
        self._make_client = make_client
        self.gather_s = gather_s
        self.client: KVStore | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.stats = {"batches": 0, "questions": 0, "largest_batch": 0}  # how much sharing happened
        self._jobs: queue.Queue[Job | Callable[[KVStore], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kvstore-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def call(self, work: Callable[[KVStore], Any]) -> asyncio.Future:
        """Run `work(client)` on the engine thread between two decode steps; an awaitable of its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def run(client: KVStore) -> None:
            try:
                result = work(client)
            except BaseException as exc:  # handed to the request that asked
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._jobs.put(run)
        return future

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
        self.ready.set()
        waiting: list[Job] = []
        running: list[_Batch] = []
        while True:
            if not self._take(waiting, block=not running and not waiting):
                break
            self._start_batches(waiting, running)
            for batch in list(running):
                self._step(batch, running)

    def _take(self, waiting: list[Job], block: bool) -> bool:
        """Move queued jobs into `waiting` (after a short gathering window when idle); False to stop."""
        deadline = None
        while True:
            try:
                if block and deadline is None:
                    item = self._jobs.get()
                    deadline = time.monotonic() + self.gather_s
                else:
                    timeout = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
                    item = self._jobs.get(timeout=timeout) if timeout else self._jobs.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            if isinstance(item, Job):
                self._prepare(item, waiting)
            else:
                item(self.client)

    def _prepare(self, job: Job, waiting: list[Job]) -> None:
        try:
            if job.refs is None:
                job.context = self.client.prepare_retrieved(job.question, job.retrieve, job.options)
            else:
                job.context = self.client.prepare(job.refs, [job.question], job.options)
        except BaseException as exc:
            job.on_done(None, exc)
            return
        waiting.append(job)

    def _start_batches(self, waiting: list[Job], running: list[_Batch]) -> None:
        busy = {id(batch.context) for batch in running}
        groups: dict[tuple[int, GenerationOptions], list[Job]] = {}
        for job in waiting:
            if id(job.context) not in busy:
                groups.setdefault((id(job.context), job.options), []).append(job)
        for (context_key, options), jobs in groups.items():
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
                job.on_done(None, error or RuntimeError("no token was decoded"))
                continue
            if job.on_piece is not None and (piece := stream.finish(row)):
                job.on_piece(piece)
            job.on_done(finished_answer(batch.context.loaded, row, job.options, batch.context.ids), None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
