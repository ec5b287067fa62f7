"""A cap on redeliveries, so a document that kills its worker every time cannot loop forever.

Late acks plus reject-on-worker-lost hand the task of a worker that died (SIGKILL, out of memory)
to the next worker: that is what makes a crash harmless. A task that itself causes the crash would
be handed out forever, since the Redis transport keeps no delivery count. So each run counts itself
in Redis before it starts and clears its count when it ends, however it ends; only a run whose
process died leaves its count behind, and the run after `limit` such deaths fails instead.
The bookkeeping is best effort: a Redis error there is logged, never made the task's outcome
(the task's own Redis calls are retried with backoff; a count left behind expires).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from celery import Task

from workers.lease import Lease

log = logging.getLogger(__name__)

KEY_PREFIX = "kvstore:v1:deliveries:"
DONE_PREFIX = "kvstore:v1:done:"


class TooManyDeliveries(RuntimeError):
    """The task's worker died during each of its previous deliveries."""


def count_delivery(client: redis.Redis, task_id: str, limit: int, ttl_s: float) -> int:
    """Record one more start of `task_id`; raise TooManyDeliveries (and forget it) beyond `limit` deaths."""
    key = KEY_PREFIX + task_id
    with client.pipeline() as pipe:
        count, _ = pipe.incr(key).expire(key, max(1, int(ttl_s))).execute()
    if count > limit:
        client.delete(key)
        raise TooManyDeliveries(
            f"task {task_id}: its worker died on each of its last {count - 1} deliveries; not running it again "
            f"(KVSTORE_MAX_DELIVERIES={limit})"
        )
    return count


def forget_delivery(client: redis.Redis, task_id: str) -> None:
    """The run ended (with a result or an exception): its process survived it."""
    client.delete(KEY_PREFIX + task_id)


class DeliveryCappedTask(Task):
    """Celery task base class that counts deliveries around each run.

    `max_deliveries` is a task option (`@app.task(..., max_deliveries=n)`); counts live as long as
    task results. Each run holds a lease (`workers.lease`): a copy delivered while another live
    process holds it (the visibility timeout passed on a slow task) retries later instead of running
    twice, and a copy delivered after the task succeeded returns that result, kept under
    `kvstore:v1:done:<task id>` (Celery's own task state cannot say: the copy's retries overwrite
    it with RETRY). Results are JSON, as the result serializer requires anyway. Eager runs (tests,
    `.apply()`) have no worker to lose and are neither counted nor leased.
    """

    max_deliveries: int = 3

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        if self.request.is_eager or task_id is None:
            return super().__call__(*args, **kwargs)
        client = self.backend.client
        done = client.get(DONE_PREFIX + task_id)
        if done is not None:  # a copy delivered after its run finished elsewhere
            return json.loads(done)
        lease = Lease(client, task_id)
        if not lease.acquire():  # another live process is running it: look again later
            wait = max(1.0, min(60.0, self.app.conf.broker_transport_options["visibility_timeout"] / 2))
            log.info("task %s: still running on another worker, checking again in %.0f s", task_id, wait)
            raise self.retry(countdown=wait, max_retries=self.request.retries + 1)
        try:
            count_delivery(client, task_id, self.max_deliveries, self.app.conf.result_expires)
        except redis.RedisError as exc:
            log.warning("task %s: delivery not counted (%s)", task_id, exc)
        try:
            with lease:
                result = super().__call__(*args, **kwargs)
                client.set(DONE_PREFIX + task_id, json.dumps(result), ex=max(1, int(self.app.conf.result_expires)))
                return result
        finally:
            try:
                forget_delivery(client, task_id)
            except redis.RedisError as exc:
                log.warning("task %s: delivery count not cleared, it will expire (%s)", task_id, exc)
