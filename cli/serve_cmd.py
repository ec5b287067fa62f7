"""`kvstore serve`: the stored contexts over HTTP, in the OpenAI chat-completions format."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable

import click

from cli.errors import fail
from cli.options import (
    Finite,
    check_model,
    kernel_option,
    model_option,
    quiet_transformers,
    store_options,
    with_settings,
)
from kvstore.config import Settings


def queue_submitter(settings: Settings) -> Callable[[str, str], str]:
    """`serve --queue`: each POSTed text becomes a one-document job for the Celery workers; its job id."""
    from kvstore.errors import import_extra

    import_extra("celery", "workers")
    from workers import jobs
    from workers.celery import close_app, create_app

    def submit(text: str, source: str) -> str:
        app = create_app(settings)
        try:
            return jobs.submit(app, [jobs.Document(text, source)])
        finally:
            close_app(app)

    return submit


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (others need KVSTORE_API_KEY).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-tokens", default=1024, show_default=True, type=click.IntRange(1, 4096), help="Largest max_tokens.")
@click.option("--max-request-mb", default=8.0, show_default=True, type=Finite(0.0, min_open=True), help="Body limit.")
@click.option("--max-contexts", default=16, show_default=True, type=click.IntRange(1), help="Loaded contexts (LRU).")
@click.option("--queue", is_flag=True, help="Ingest POSTed texts through the Celery workers (returns a job id).")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@model_option
@kernel_option
@store_options
@with_settings
def serve(
    host: str,
    port: int,
    max_tokens: int,
    max_request_mb: float,
    max_contexts: int,
    queue: bool,
    log_level: str,
    settings: Settings,
) -> None:
    """Serve stored contexts over HTTP with an OpenAI-compatible chat-completions API.

    Any OpenAI client works: name the stored contexts with the extension field "contexts" (ids or
    id prefixes, composed in that order) or "retrieve": {"k": 4}; the question is the last user
    message (system messages and earlier turns are folded in before it as plain text).
    Also: GET /v1/models, GET/POST /v1/contexts, GET/DELETE /v1/contexts/{id}, GET /healthz.
    Binding anywhere but the loopback needs an API key (KVSTORE_API_KEY, sent as a Bearer token).

    \b
    Example:
        kvstore serve --port 8000
        curl localhost:8000/v1/chat/completions -d '{"model": "smollm2-135m",
          "contexts": ["3f2a9c1b"], "messages": [{"role": "user", "content": "Who is the keeper?"}]}'
    """
    check_model(settings)
    from kvstore.errors import import_extra

    uvicorn = import_extra("uvicorn", "serve")
    import_extra("fastapi", "serve")
    from kvstore.server.app import ServerSettings, create_app

    api_key = os.environ.get("KVSTORE_API_KEY") or None
    if not _loopback(host) and not api_key:
        fail(f"binding {host} exposes the store beyond this machine: set KVSTORE_API_KEY (a Bearer token) first")
    quiet_transformers()
    server = ServerSettings(api_key, int(max_request_mb * 2**20), max_tokens, max_contexts)
    submit = queue_submitter(settings) if queue else None
    uvicorn.run(create_app(settings, server, submit), host=host, port=port, log_level=log_level)
