"""The HTTP API: OpenAI-compatible chat completions over stored contexts, plus the contexts themselves.

    POST   /v1/chat/completions   OpenAI format; `contexts: [...]` (composed in order) or `retrieve: {k}`
    GET    /v1/models             the model this server answers with
    GET    /v1/contexts           stored contexts (`?q=` searches them, `?limit=`)
    GET    /v1/contexts/{ref}     one context (or every part of a document), by id or id prefix
    POST   /v1/contexts           ingest a text (in process, or handed to the queue the app was given)
    DELETE /v1/contexts/{ref}     remove it
    GET    /healthz               "ok", or 503 while the model loads

Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 a
missing or wrong API key, 404 an unknown context or model, 413 a request over the size limit, 503
while the model loads or when Redis is unreachable. Refs are ids and prefixes only: a remote caller
can never make the server read a file. A failed request stores nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvstore.client import KVStore
from kvstore.config import Settings
from kvstore.decode.generation import DEFAULT_MAX_NEW_TOKENS, Answer, GenerationOptions
from kvstore.errors import InputError, KVStoreError, NotFoundError, UnavailableError, redact
from kvstore.server.documents import ingest_whole
from kvstore.server.engine import Engine, Job
from kvstore.server.messages import fold
from kvstore.server.schemas import ChatRequest, IngestRequest
from kvstore.storage.index import ContextRecord


@dataclass(frozen=True)
class ServerSettings:
    """What only the server needs (the store, model and defaults come from `Settings`)."""

    api_key: str | None = None  # required as a Bearer token when set
    max_request_bytes: int = 8 * 2**20
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_contexts: int = 16  # loaded contexts kept in memory (LRU)


# Hands a POSTed text (and its source) to a queue instead of ingesting it here; returns the job id.
# The server knows no queue: `kvstore serve --queue` passes one in (the Celery workers').
Submit = Callable[[str, str], str]


class APIError(Exception):
    """An error answered in the OpenAI shape (passwords in quoted URLs masked)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        message = redact(message)
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _from_library(exc: Exception) -> APIError:
    if isinstance(exc, NotFoundError):
        return APIError(404, str(exc), "not_found_error", "context_not_found")
    if isinstance(exc, UnavailableError):
        return APIError(503, str(exc), "server_error", "unavailable")
    if isinstance(exc, InputError | ValueError):
        return APIError(400, str(exc))
    return APIError(500, str(exc), "server_error")


class LimitBody:
    """ASGI middleware: a request body over the limit is answered 413 before the app reads it whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        too_big = APIError(413, f"request body over the {self.limit:,}-byte limit", code="request_too_large")
        if declared is not None and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooBig
            return message

        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await too_big.response()(scope, receive, send)


class _TooBig(Exception):
    pass


def _record_view(record: ContextRecord, score: float | None = None) -> dict[str, Any]:
    view = {
        "id": record.id,
        "object": "context",
        "source": record.source,
        "part": record.part,
        "parts": record.parts,
        "tokens": record.original_length,
        "model": record.model,
        "press": record.press,
        "ratio_achieved": record.ratio_achieved,
        "bytes": record.bytes,
        "created": int(record.created),
    }
    return view if score is None else {**view, "score": score}


def create_app(settings: Settings, server: ServerSettings | None = None, submit: Submit | None = None) -> FastAPI:
    """The ASGI app: an engine (`kvstore.server.engine`) owns the client and its model; handlers hand it
    questions and use the store directly.

    With `submit`, POST /v1/contexts queues the text through it (202 and a job id) instead of ingesting.
    """
    server = server or ServerSettings()
    engine = Engine(lambda: KVStore(settings, max_contexts=server.max_contexts, untrusted_refs=True))
    ingest_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()
        if engine.client is not None:
            engine.client.close()

    app = FastAPI(title="kvstore", lifespan=lifespan)
    app.add_middleware(LimitBody, limit=server.max_request_bytes)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if server.api_key and request.url.path != "/healthz":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), server.api_key.encode()):
                return APIError(401, "missing or wrong API key", "authentication_error", "invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return APIError(400, f"{where}: {first.get('msg', 'invalid request')}").response()

    @app.exception_handler(KVStoreError)
    async def library_error(request: Request, exc: KVStoreError) -> JSONResponse:
        return _from_library(exc).response()

    def client() -> KVStore:
        if not engine.ready.is_set():
            raise APIError(503, "the model is still loading; retry in a moment", "server_error", "loading")
        if engine.error is not None:
            raise APIError(503, f"the server cannot answer: {engine.error}", "server_error", "model_error")
        return engine.client

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading", "model": settings.model}, status_code=503)
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", "model": settings.model, **engine.stats})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": settings.model, "object": "model", "created": 0, "owned_by": "kvstore"}],
        }

    @app.get("/v1/contexts")
    async def list_contexts(q: str | None = None, limit: int = 50) -> dict[str, Any]:
        kv = client()
        if not 1 <= limit <= 1000:
            raise APIError(400, "limit must be in [1, 1000]")
        if q is not None:
            hits = await asyncio.to_thread(kv.search, q, limit)
            return {"object": "list", "data": [_record_view(h.record, h.score) for h in hits]}
        records = await asyncio.to_thread(kv.store.list, limit)
        return {"object": "list", "data": [_record_view(r) for r in records]}

    @app.get("/v1/contexts/{ref}")
    async def get_context(ref: str) -> dict[str, Any]:
        records = await asyncio.to_thread(client().resolve, ref)
        return {"object": "list", "data": [_record_view(r) for r in records]}

    @app.delete("/v1/contexts/{ref}")
    async def delete_context(ref: str) -> dict[str, Any]:
        client()
        removed = await asyncio.to_thread(engine.locked, lambda kv: kv.delete(ref))  # running batches keep theirs
        return {"object": "list", "data": [{"id": r.id, "object": "context", "deleted": True} for r in removed]}

    @app.post("/v1/contexts")
    async def ingest(body: IngestRequest) -> JSONResponse:
        kv = client()
        if len(body.text.encode()) > settings.max_document_bytes:
            raise APIError(
                413, f"document over the {settings.max_document_bytes:,}-byte limit", code="document_too_large"
            )
        if submit is not None:
            job_id = await asyncio.to_thread(submit, body.text, body.source or "http")
            return JSONResponse({"object": "job", "id": job_id, "status": "queued"}, status_code=202)

        def run() -> list[dict[str, Any]]:
            with ingest_lock:  # one at a time; decoding goes on in the engine thread meanwhile
                parts = ingest_whole(kv, body.text, body.source)
            return [{**_record_view(p.record), "created": p.created} for p in parts]

        return JSONResponse({"object": "list", "data": await asyncio.to_thread(run)}, status_code=201)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        """OpenAI chat completions over the stored contexts that `contexts` or `retrieve` names.

        The stored context's chat-template head is fixed, so the messages become the text of its one
        user turn (`kvstore.server.messages`): every system/developer text, then each earlier turn as
        "User: <text>" or "Assistant: <text>", then the last message (the user's question) as is,
        separated by blank lines.
        """
        kv = client()
        if body.model not in (settings.model, "kvstore"):
            message = f"model {body.model!r} is not served here (this server answers with {settings.model!r})"
            raise APIError(404, message, "not_found_error", "model_not_found")
        if body.contexts is None and body.retrieve is None:
            raise APIError(400, "name the stored contexts to answer from: `contexts: [ids]` or `retrieve: {k: 4}`")
        max_new = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new > server.max_tokens:
            raise APIError(400, f"max_tokens {max_new:,} is over this server's limit of {server.max_tokens:,}")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        options = GenerationOptions(max_new, body.temperature or 0.0, body.top_p or 1.0, 0, stop, body.seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(
            fold(body.messages),
            options,
            refs=body.contexts,
            retrieve=body.retrieve.k if body.retrieve else 0,
            on_piece=(lambda piece: emit("piece", piece)) if body.stream else None,
            on_done=lambda answer, error: emit("done", (answer, error)),
        )
        engine.submit(job)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = await events.get()
        if first[0] == "done" and first[1][1] is not None:
            raise _from_library(first[1][1]) if not isinstance(first[1][1], APIError) else first[1][1]
        if not body.stream:
            answer: Answer = first[1][0]
            return _completion(completion_id, created, settings.model, answer, await _contexts(kv, answer.contexts))
        return StreamingResponse(
            _chunks(kv, first, events, completion_id, created, settings.model), media_type="text/event-stream"
        )

    return app


async def _contexts(kv: KVStore, ids: tuple[str, ...]) -> list[dict[str, Any]]:
    records = await asyncio.to_thread(lambda: [kv.store.get(i) for i in ids])
    return [_record_view(r) for r in records if r is not None]


def _completion(completion_id: str, created: int, model: str, answer: Answer, contexts: list) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": str(answer)},
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
        "contexts": contexts,
    }


def _chunk(completion_id: str, created: int, model: str, delta: dict, finish: str | None, **extra: Any) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


async def _chunks(
    kv: KVStore,
    first: tuple[str, Any],
    events: asyncio.Queue,
    completion_id: str,
    created: int,
    model: str,
) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format; the last chunk names the contexts and usage."""
    yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None)
    event = first
    while True:
        kind, value = event
        if kind == "piece":
            yield _chunk(completion_id, created, model, {"content": value}, None)
        else:
            answer, error = value
            if error is not None:  # headers are gone: report it in the stream, as OpenAI does
                failure = _from_library(error) if not isinstance(error, APIError) else error
                yield f"data: {json.dumps({'error': {'message': failure.message, 'type': failure.kind}})}\n\n"
            else:
                usage = {
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                }
                contexts = await _contexts(kv, answer.contexts)
                yield _chunk(completion_id, created, model, {}, answer.finish_reason, usage=usage, contexts=contexts)
            yield "data: [DONE]\n\n"
            return
        event = await events.get()
