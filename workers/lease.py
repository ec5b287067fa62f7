"""A running task's lease: proof, refreshed by a heartbeat, that some live process is working on it.

The Redis transport hands an unacknowledged task to another worker once its visibility timeout
passes, whether the first worker died or is merely slow. With a short visibility timeout (so a dead
worker's task is picked up in minutes, not after the longest task's time limit), a slow task would
then run twice. The lease tells the two apart: a process holds `kvstore:v1:lease:<task id>` while it
runs the task and refreshes it every `ttl / 3` seconds from a daemon thread; it lapses `ttl` seconds
after the process dies. A delivery that finds a live lease leaves the task to its holder and checks
again later; one that finds none runs it. A run that ends leaves its lease to lapse a few seconds
later rather than deleting it: Celery stores the result only after the run returns, and a copy
arriving in between must still wait, then find that result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from types import TracebackType

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "kvstore:v1:lease:"
DEFAULT_TTL_S = 30.0
LINGER_S = 10.0  # how long an ended run still holds its lease (result storing takes milliseconds)


class Lease:
    """Held while a task runs (a context manager); `acquire` is False when another live run holds it."""

    def __init__(self, client: redis.Redis, task_id: str, ttl_s: float = DEFAULT_TTL_S):
        self.client, self.key, self.ttl_ms = client, KEY_PREFIX + task_id, max(1000, int(ttl_s * 1000))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return False
        self._beat = threading.Thread(target=self._heartbeat, name="kvstore-lease", daemon=True)
        self._beat.start()
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
        self.release(linger_s=LINGER_S)
