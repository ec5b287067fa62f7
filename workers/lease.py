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

from types import TracebackType

import redis

from kvstore.storage import lease

KEY_PREFIX = "kvstore:v1:lease:"
DEFAULT_TTL_S = lease.DEFAULT_TTL_S
LINGER_S = 10.0  # how long an ended run still holds its lease (result storing takes milliseconds)


class Lease(lease.Lease):
    """The lease of one task id (see `kvstore.storage.lease.Lease`); an ended run's lease lingers."""

    def __init__(self, client: redis.Redis, task_id: str, ttl_s: float = DEFAULT_TTL_S):
        super().__init__(client, KEY_PREFIX + task_id, ttl_s)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release(linger_s=LINGER_S)
