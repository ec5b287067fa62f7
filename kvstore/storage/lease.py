"""A lease: proof, refreshed by a heartbeat, that some live process holds a Redis key's job.

The holder sets the key (NX, with a time to live) and refreshes it every `ttl / 3` seconds from a
daemon thread; it lapses `ttl` seconds after the process dies, so a crashed holder never blocks
anyone for long. Blob writers hold `{prefix}writing:{id}` from before their temp file until their
record has committed, and gc takes the same lease before it deletes anything of that id, so gc
never removes a blob or a temp file a live writer holds. Workers hold one per running task
(`workers.lease`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from types import TracebackType

import redis

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0


class Lease:
    """Held while a job runs (a context manager); `acquire` is False when another live process holds it."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float = DEFAULT_TTL_S):
        self.client, self.key, self.ttl_ms = client, key, max(1000, int(ttl_s * 1000))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return False
        self._beat = threading.Thread(target=self._heartbeat, name="kvstore-lease", daemon=True)
        self._beat.start()
        return True

    def wait(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Acquire, waiting up to `timeout_s` for the holder to finish (or to die and let it lapse)."""
        deadline = time.monotonic() + timeout_s
        while not self.acquire():
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_s)
            poll_s = min(0.25, poll_s * 1.5)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:  # extend only our own lease (a lapsed one may belong to a new run by now)
                with self.client.pipeline() as pipe:
                    pipe.watch(self.key)
                    if not self._held(pipe.get(self.key)):
                        return
                    pipe.multi()
                    pipe.pexpire(self.key, self.ttl_ms)
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("lease %s not refreshed (%s): it may lapse", self.key, exc)

    def _held(self, value: bytes | str | None) -> bool:
        """Whether a value read back is our owner tag (Celery's client returns bytes, ours str)."""
        return (value.decode() if isinstance(value, bytes) else value) == self.owner

    def release(self, linger_s: float = 0.0) -> None:
        """Stop the heartbeat; free the lease now, or let it lapse after `linger_s` seconds."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self._held(self.client.get(self.key)):
                if linger_s > 0:
                    self.client.pexpire(self.key, int(linger_s * 1000))
                else:
                    self.client.delete(self.key)
        except redis.RedisError as exc:
            log.warning("lease %s not released (%s): it will lapse", self.key, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
