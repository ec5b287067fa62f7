"""Task policies without a worker or a model: what is retried, what fails at once, what is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvstore.storage.index import ContextIndex, IndexUnavailableError, open_redis
from kvstore.text.documents import DocumentError
from workers.deliveries import KEY_PREFIX, TooManyDeliveries, count_delivery, forget_delivery


@pytest.fixture
def tasks(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    # Tasks run eagerly here: nothing may reach a broker, and no embedded Redis may start in ~/.kvstore.
    monkeypatch.setenv("KVSTORE_BROKER_URL", "redis://127.0.0.1:1/0")
    from workers import tasks

    yield tasks


@pytest.mark.parametrize(
    "error", [IndexUnavailableError("index down"), redis.exceptions.ConnectionError("reset"), redis.TimeoutError()]
)
def test_transient_errors_are_retried_then_reported(tasks, monkeypatch: pytest.MonkeyPatch, error) -> None:
    calls = []

    def unavailable() -> None:
        calls.append(1)
        raise error

    monkeypatch.setattr(tasks.runtime, "client", unavailable)
    result = tasks.ingest_document.apply(kwargs={"text": "The door is green.", "source": "door.md"})
    assert isinstance(result.result, type(error))
    assert len(calls) == 1 + tasks.ingest_document.max_retries
    assert tasks.ingest_document.retry_backoff and tasks.ingest_document.retry_jitter


def test_bad_input_is_not_retried(tasks, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(tasks.runtime, "client", lambda: calls.append(1))
    result = tasks.ingest_document.apply(kwargs={"path": "/no/such/file.md"})
    assert isinstance(result.result, DocumentError) and not calls
    refused = tasks.ingest_document.apply(kwargs={"text": "x", "settings": {"home": "/elsewhere"}})
    assert isinstance(refused.result, ValueError) and "cannot be set per document" in str(refused.result)


def test_questions_must_come_as_a_list(tasks, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(tasks.runtime, "client", lambda: calls.append(1))
    for questions in ("What is it?", ["ok", ""], [3]):
        refused = tasks.answer_questions.apply(args=["deadbeefcafe", questions])
        assert isinstance(refused.result, DocumentError) and not calls


def test_tasks_have_time_limits_and_late_acks(tasks) -> None:
    for task in (tasks.ingest_document, tasks.answer_questions):
        assert 0 < task.soft_time_limit < task.time_limit
    conf = tasks.app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > tasks.ingest_document.time_limit
    assert conf.task_routes["kvstore.answer_questions"]["queue"] == "kvstore.answer"


def test_deliveries_are_counted_until_the_limit_then_refused(tmp_path: Path) -> None:
    client, _ = open_redis(None, tmp_path)
    try:
        assert [count_delivery(client, "t1", limit=2, ttl_s=60) for _ in range(2)] == [1, 2]
        assert 0 < client.ttl(KEY_PREFIX + "t1") <= 60
        with pytest.raises(TooManyDeliveries, match="last 2 deliveries"):
            count_delivery(client, "t1", limit=2, ttl_s=60)
        assert client.get(KEY_PREFIX + "t1") is None  # refused once, then forgotten
        count_delivery(client, "t2", limit=2, ttl_s=60)
        forget_delivery(client, "t2")  # a run that ended, however it ended
        assert count_delivery(client, "t2", limit=2, ttl_s=60) == 1
    finally:
        ContextIndex(client).close()
