"""Task policies without a worker or a model: what is retried, what fails at once, what is refused."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvstore.decode.answer import Answer
from kvstore.decode.generation import GenerationOptions
from kvstore.errors import InputError
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


BAD_OPTIONS = [
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"num_beams": 2}, "unknown generation options: num_beams"),
    ({"do_sample": "yes"}, "do_sample must be"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop takes at most"),
    ({"stop": ["x" * 65]}, "at most 64 characters"),
    ({"stop": 7}, "stop must be a string or a list"),
    ({"seed": "3"}, "seed must be an integer"),
    ({"seed": 2**64}, "seed must be an integer"),
    (["max_new_tokens", 8], "must be a JSON object"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_answer_options_are_checked_before_any_model_work(tasks, monkeypatch, options, message: str) -> None:
    calls = []
    monkeypatch.setattr(tasks.runtime, "client", lambda: calls.append(1))
    refused = tasks.answer_questions.apply(args=["deadbeefcafe", ["What is it?"], options])
    assert isinstance(refused.result, InputError) and message in str(refused.result) and not calls


def test_answers_come_back_as_json_that_names_what_produced_them(tasks, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    class Client:
        def ask_many(self, ref: object, questions: list[str], options: GenerationOptions) -> list[Answer]:
            asked.append((ref, questions, options))
            return [Answer(f"answer {i}", ["c1", "c2"], 40 + i, 3, "stop") for i in range(len(questions))]

    monkeypatch.setattr(tasks.runtime, "client", Client)
    options = {"max_new_tokens": 12, "do_sample": True, "top_p": 0.9, "top_k": 5, "stop": ["\n\n"], "seed": 3}
    results = tasks.answer_questions.apply(args=[["c1", "c2"], ["First?", "Second?"], options]).get()
    assert json.loads(json.dumps(results)) == results
    assert results[1] == {
        "text": "answer 1",
        "contexts": ["c1", "c2"],
        "prompt_tokens": 41,
        "completion_tokens": 3,
        "finish_reason": "stop",
    }
    typed = Answer.from_dict(results[1])  # what `workers.jobs.ask` hands its caller
    assert typed == "answer 1" and typed.contexts == ("c1", "c2") and typed.finish_reason == "stop"
    [(ref, questions, chosen)] = asked
    assert ref == ["c1", "c2"] and questions == ["First?", "Second?"]
    assert chosen == GenerationOptions(12, temperature=1.0, top_p=0.9, top_k=5, stop=("\n\n",), seed=3)
    greedy = GenerationOptions.from_dict({"do_sample": False, "temperature": 0.7, "stop": "END"})
    assert not greedy.sampling and greedy.stop == ("END",)


def test_tasks_have_time_limits_and_late_acks(tasks) -> None:
    for task in (tasks.ingest_document, tasks.answer_questions):
        assert 0 < task.soft_time_limit < task.time_limit
    conf = tasks.app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    # A dead worker's task is picked up within minutes, far sooner than the longest task may run
    # (leases keep a slow task from running twice: test_workers checks it end to end).
    assert conf.broker_transport_options["visibility_timeout"] < tasks.ingest_document.time_limit / 10
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


def test_tasks_read_paths_only_under_the_allowed_folder(tasks, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []
    monkeypatch.setattr(tasks.runtime, "client", lambda: calls.append(1))
    secret = tmp_path / "secret.txt"
    secret.write_text("the server's own file")
    refused = tasks.ingest_document.apply(kwargs={"path": str(secret)})
    assert isinstance(refused.result, DocumentError) and "reads no paths" in str(refused.result)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.mkfifo(allowed / "pipe.txt")
    monkeypatch.setenv("KVSTORE_FILES_ROOT", str(allowed))
    outside = tasks.ingest_document.apply(kwargs={"path": "../secret.txt"})
    assert isinstance(outside.result, DocumentError) and "outside the folder" in str(outside.result)
    fifo = tasks.ingest_document.apply(kwargs={"path": "pipe.txt"})  # refused at once, never blocks
    assert isinstance(fifo.result, DocumentError) and "not a regular file" in str(fifo.result)
    assert not calls


def test_a_lease_is_exclusive_refreshed_and_lapses_when_its_holder_stops(tmp_path) -> None:
    from kvstore.storage.index import ContextIndex, open_redis
    from workers.lease import Lease

    client, _ = open_redis(None, tmp_path)
    raw = redis.Redis(unix_socket_path=client.socket_file)  # bytes replies, like Celery's own client
    try:
        # Celery's own client (which the workers pass) returns bytes: hold the lease through one of those.
        first, second = Lease(raw, "task-1", ttl_s=1.5), Lease(client, "task-1", ttl_s=1.5)
        assert first.acquire() and not second.acquire()
        time.sleep(2.5)  # longer than the TTL: the heartbeat kept it alive
        assert not second.acquire()
        first.release()
        assert second.acquire()  # released: the next run takes it
        second._stop.set()  # its holder "dies": no more heartbeats
        time.sleep(2.0)
        third = Lease(client, "task-1", ttl_s=1.5)
        assert third.acquire()  # lapsed
        with third:  # a run that ends keeps its lease a little longer (its result is not stored yet)
            pass
        assert not Lease(client, "task-1").acquire()
        assert 0 < client.pttl("kvstore:v1:lease:task-1") <= 10_000
    finally:
        ContextIndex(client).close()
