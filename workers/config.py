"""Celery configuration derived from kvstore Settings, so the library, the CLI and the workers agree.

Worker-only knobs (env vars, all optional):

    KVSTORE_BROKER_URL          broker and result backend (default: KVSTORE_REDIS_URL, else the embedded Redis)
    KVSTORE_INGEST_TIME_LIMIT   hard limit in seconds for one document (default 3600; soft limit 60 s earlier)
    KVSTORE_ANSWER_TIME_LIMIT   hard limit in seconds for one batch of questions (default 600)
    KVSTORE_VISIBILITY_TIMEOUT  seconds before a task held by a dead worker is redelivered (default 300; a
                                slow task redelivered while its worker lives is not run twice: see workers.lease)
    KVSTORE_FILES_ROOT          ingest tasks may name a file under this folder (default: none, text only)
    KVSTORE_RESULT_EXPIRES      seconds task results and job records are kept (default 7 days)
    KVSTORE_MAX_DELIVERIES      a task whose worker died this many times fails instead of running again (default 3)
    KVSTORE_TASK_EVENTS         1: workers send task events (for Flower)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kombu import Exchange, Queue

from kvstore.config import Settings

DEFAULT_VISIBILITY_TIMEOUT_S = 300.0
INGEST_QUEUE = "kvstore.ingest"
ANSWER_QUEUE = "kvstore.answer"
QUEUES = (INGEST_QUEUE, ANSWER_QUEUE)
INGEST_TASK = "kvstore.ingest_document"
ANSWER_TASK = "kvstore.answer_questions"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class WorkerSettings:
    """Queue-side settings; each field reads its env var (module docstring) when not given."""

    broker_url: str | None = field(default_factory=lambda: os.environ.get("KVSTORE_BROKER_URL") or None)
    ingest_time_limit: float = field(default_factory=lambda: _env_float("KVSTORE_INGEST_TIME_LIMIT", 3600.0))
    answer_time_limit: float = field(default_factory=lambda: _env_float("KVSTORE_ANSWER_TIME_LIMIT", 600.0))
    visibility_timeout: float | None = field(
        default_factory=lambda: _env_float("KVSTORE_VISIBILITY_TIMEOUT", 0.0) or None
    )
    result_expires: float = field(default_factory=lambda: _env_float("KVSTORE_RESULT_EXPIRES", 7 * 86400.0))
    task_events: bool = field(default_factory=lambda: os.environ.get("KVSTORE_TASK_EVENTS", "") in ("1", "true"))
    max_deliveries: int = field(default_factory=lambda: int(_env_float("KVSTORE_MAX_DELIVERIES", 3)))

    @property
    def redelivery_after(self) -> float:
        """Visibility timeout: how long a task held by a worker that died waits before another takes it.

        Short by default (5 minutes), because a slow task redelivered while its worker still runs it is
        not run twice: the run's lease (`workers.lease`) sends the copy back to wait. The trade-off: a
        long task is redelivered (and sent back) every few minutes, a few cheap messages.
        """
        return self.visibility_timeout or DEFAULT_VISIBILITY_TIMEOUT_S


def soft_limit(hard: float) -> float:
    """The soft limit raises inside the task first, so it fails cleanly before the hard kill."""
    return max(1.0, hard - min(60.0, hard * 0.1))


def celery_url(redis_url: str) -> str:
    """A Redis URL as kombu and Celery spell it (unix:// becomes redis+socket://)."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        return f"redis+socket://{parts.path}"
    if parts.scheme not in ("redis", "rediss", "redis+socket"):
        raise ValueError(f"unsupported broker URL scheme {parts.scheme!r}: use redis://, rediss:// or unix://")
    return redis_url


def celery_config(broker_url: str, worker: WorkerSettings | None = None) -> dict[str, Any]:
    """Everything Celery needs besides the URL: queues, delivery guarantees, serialization, expiry."""
    worker = worker or WorkerSettings()
    redelivery = worker.redelivery_after
    transport = {
        "visibility_timeout": redelivery,
        # Sweep for abandoned messages often enough that a short visibility timeout is honoured.
        "unacked_restore_interval": max(1, min(10, int(redelivery // 2))),
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": broker_url,
        "result_backend": broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": redelivery},
        "broker_connection_retry_on_startup": True,
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        "task_default_queue": INGEST_QUEUE,
        "task_routes": {INGEST_TASK: {"queue": INGEST_QUEUE}, ANSWER_TASK: {"queue": ANSWER_QUEUE}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": int(worker.result_expires),
        "worker_send_task_events": worker.task_events,
        "task_send_sent_event": worker.task_events,
        "timezone": "UTC",
    }


def effective_broker_url(settings: Settings, worker: WorkerSettings | None = None) -> str | None:
    """The configured broker URL, or None when the embedded Redis of the store home is meant."""
    worker = worker or WorkerSettings()
    url = worker.broker_url or settings.redis_url
    return celery_url(url) if url else None
