"""Celery workers end to end: real `kvstore worker` processes, real Redis (embedded; KVSTORE_REDIS_URL when set).

The default model (smollm2-135m) runs in the workers. Documents are short; the fast StreamingLLM
press is used where the test is about the queue, KVzip where a task must last long enough to be
killed in the middle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery
from click.testing import CliRunner

from cli.main import main
from kvstore.config import Compression, Settings
from kvstore.storage.index import ContextIndex, open_redis
from kvstore.storage.maintenance import gc
from kvstore.storage.store import ContextStore
from workers import deliveries, jobs
from workers.celery import close_app, create_app, producer
from workers.config import INGEST_TASK, WorkerSettings

pytestmark = pytest.mark.model

TARGETS = ["embedded"] + (["server"] if os.environ.get("KVSTORE_REDIS_URL") else [])
KVSTORE = str(Path(sys.executable).with_name("kvstore"))
VISIBILITY_TIMEOUT_S = 12  # a killed worker's task is redelivered this long after it was handed out
FAST = Compression(press="streaming", ratio=0.25)

LIGHTHOUSE = jobs.Document(
    "The lighthouse on Gull Point has a door painted bright green.\n\nIts keeper, Mara, lives there with two cats.",
    "lighthouse.md",
)
BAKERY = jobs.Document("The bakery on Elm Street opens at seven. Its best bread is a dark rye sourdough.", "bakery.txt")
ESSAYS = [
    jobs.Document(
        " ".join(f"Paragraph {i} of the {topic} essay says the {topic} committee met on day {i}." for i in range(12)),
        f"{topic}.md",
    )
    for topic in ("harbour", "orchard")
]


def _free_db(url: str) -> str:
    """The server URL with an empty database, so a shared server's other data is never touched."""
    parts = urlsplit(url)
    for db in range(15, 0, -1):
        candidate = urlunsplit(parts._replace(path=f"/{db}"))
        client = redis.Redis.from_url(candidate)
        try:
            if client.dbsize() == 0:
                return candidate
        finally:
            client.close()
    pytest.skip(f"no empty database on {url}")


@dataclass
class Target:
    """One Redis (embedded or server) with a store home, a client app and the workers started on it."""

    settings: Settings
    env: dict[str, str]
    app: Celery
    logs: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen:
        log = open(self.logs / f"worker-{len(self.workers)}.log", "w")  # noqa: SIM115 (the process owns it)
        process = subprocess.Popen(
            [KVSTORE, "worker", "-c", "1", "-n", f"w{len(self.workers)}@%h", "-l", "info"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL reaches the pool process too
        )
        self.workers.append(process)
        return process

    def kill(self, process: subprocess.Popen) -> None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.terminate()  # warm shutdown: the main process stops its pool itself
        for process in self.workers:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def store(self) -> ContextStore:
        return ContextStore.open(self.settings)

    def log_tail(self, full: bool = False) -> str:
        return "\n".join(p.read_text()[0 if full else -3000 :] for p in sorted(self.logs.glob("worker-*.log")))


@pytest.fixture(scope="module", params=TARGETS)
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("home")
    url = None if request.param == "embedded" else _free_db(os.environ["KVSTORE_REDIS_URL"])
    keeper = open_redis(None, home)[0] if url is None else None  # the test owns the embedded server
    settings = Settings(home=home, redis_url=url, device="cpu")
    env = {k: v for k, v in os.environ.items() if k not in ("KVSTORE_REDIS_URL", "KVSTORE_BROKER_URL")}
    env |= {
        "KVSTORE_HOME": str(home),
        "KVSTORE_DEVICE": "cpu",
        "KVSTORE_MODEL": "smollm2-135m",
        "KVSTORE_PRESS": "kvzip",
        "KVSTORE_RATIO": "0.75",
        "KVSTORE_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S),
        **({"KVSTORE_REDIS_URL": url} if url else {}),
    }
    app = create_app(settings, WorkerSettings(broker_url=None, visibility_timeout=VISIBILITY_TIMEOUT_S))
    target = Target(settings, env, app, tmp_path_factory.mktemp("logs"))
    target.start_worker()
    yield target
    target.stop_all()
    if url is not None:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
    close_app(app)
    if keeper is not None:
        ContextIndex(keeper).close()


def _wait(target: Target, job_id: str, timeout: float = 150) -> jobs.JobStatus:
    try:
        return jobs.wait(target.app, job_id, timeout=timeout, poll_s=0.3)
    except TimeoutError:
        pytest.fail(f"job did not finish; worker logs:\n{target.log_tail()}")


def test_batch_is_ingested_indexed_and_answerable(target: Target) -> None:
    job_id = jobs.submit(target.app, [LIGHTHOUSE, BAKERY], FAST)
    status = _wait(target, job_id)
    assert [d.state for d in status.documents] == ["done", "done"], status
    with target.store() as store:
        for document in status.documents:
            [context_id] = document.context_ids
            record = store.require(context_id)
            assert record.source == document.source
            assert record.press["press"] == "streaming"
            store.load(context_id)  # complete and checksummed
    [answer] = jobs.ask(
        target.app,
        status.documents[0].context_ids[0],
        ["What is the name of the keeper?"],
        max_new_tokens=12,
        timeout=120,
    )
    assert "mara" in answer.lower()  # the end of the text: StreamingLLM keeps it
    assert answer.contexts == (status.documents[0].context_ids[0],) and 0 < answer.completion_tokens <= 12
    bakery, lighthouse = (d.context_ids[0] for d in reversed(status.documents))
    question = ["What is the name of the keeper?"]
    [composed] = jobs.ask(target.app, [bakery, lighthouse], question, {"max_new_tokens": 12}, timeout=120)
    assert "mara" in composed.lower()  # one answer from both stored contexts, composed on the worker
    assert composed.contexts == (bakery, lighthouse) and composed.prompt_tokens > answer.prompt_tokens
    [cut] = jobs.ask(target.app, lighthouse, question, {"max_new_tokens": 2, "temperature": 0.5, "seed": 1})
    assert cut.completion_tokens == 2 and cut.finish_reason == "length"  # the options travelled with the task


def test_bad_input_fails_at_once_with_a_clear_message(target: Target) -> None:
    status = _wait(target, jobs.submit(target.app, [jobs.Document("  \n ", "blank.md")]))
    [document] = status.documents
    assert document.state == "failed"
    assert "DocumentError" in document.error and "blank.md: the document is empty" in document.error
    assert f"{document.task_id}] retry" not in target.log_tail()  # failed, not retried


def test_submitting_the_same_documents_again_stores_nothing_new(target: Target) -> None:
    first = _wait(target, jobs.submit(target.app, [LIGHTHOUSE, BAKERY], FAST))
    with target.store() as store:
        before = {r.id: r.created for r in store.list()}
    again = _wait(target, jobs.submit(target.app, [LIGHTHOUSE, BAKERY], FAST))
    assert [d.context_ids for d in again.documents] == [d.context_ids for d in first.documents]
    with target.store() as store:
        assert {r.id: r.created for r in store.list()} == before


def test_a_sigkilled_worker_task_is_redelivered_and_stored_once(target: Target) -> None:
    job_id = jobs.submit(target.app, ESSAYS)  # default press (KVzip): long enough to be caught mid-task
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = jobs.job_status(target.app, job_id)
        if any(d.state in ("prefilling", "scoring") for d in status.documents):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no document reached prefill; worker logs:\n{target.log_tail()}")
    [running] = [w for w in target.workers if w.poll() is None]
    target.kill(running)
    killed = [d.source for d in status.documents if not d.finished]
    with target.store() as store:  # nothing partial: only complete documents have records
        visible = [r for r in store.list() if r.source in {e.source for e in ESSAYS}]
        assert {r.source for r in visible}.isdisjoint(killed)
        for record in visible:
            store.load(record.id)

    target.start_worker()
    final = _wait(target, job_id)
    assert [d.state for d in final.documents] == ["done", "done"], final
    with target.store() as store:
        records = [r for r in store.list() if r.source in {e.source for e in ESSAYS}]
        assert sorted(r.source for r in records) == sorted(e.source for e in ESSAYS)  # each stored once
        assert sorted(r.id for r in records) == sorted(i for d in final.documents for i in d.context_ids)
        for record in records:
            store.load(record.id)
        assert not gc(store, grace_s=0).stale_records


def test_a_slow_task_redelivered_while_its_worker_lives_runs_once(target: Target) -> None:
    """Longer than the visibility timeout: the copy handed to the second worker waits on the lease."""
    target.start_worker()
    long_text = " ".join(f"Sentence {i} of the long ledger notes that shipment {i} left the dock." for i in range(330))
    started = time.monotonic()
    status = _wait(target, jobs.submit(target.app, [jobs.Document(long_text, "ledger.md")]), timeout=400)
    assert status.documents[0].state == "done", status
    assert time.monotonic() - started > VISIBILITY_TIMEOUT_S + 6  # long enough to have been handed out again
    logs = target.log_tail(full=True)
    assert logs.count("ingesting ledger.md") == 1, logs[-3000:]  # it ran once
    assert "still running on another worker" in logs
    with target.store() as store:
        assert [r.source for r in store.list()].count("ledger.md") == 1


def test_a_task_whose_worker_kept_dying_fails_instead_of_running_again(target: Target) -> None:
    client = target.app.backend.client
    done = _wait(target, jobs.submit(target.app, [BAKERY], FAST))
    assert done.documents[0].state == "done"
    assert client.keys(deliveries.KEY_PREFIX + "*") == []  # a run that ended leaves no count behind

    poison = target.app.signature(
        INGEST_TASK, kwargs={"text": LIGHTHOUSE.text, "source": "poison.md", "settings": FAST.to_dict()}
    )
    result = poison.freeze()
    limit = WorkerSettings().max_deliveries
    client.set(deliveries.KEY_PREFIX + result.id, limit)  # as if its worker had died `limit` times
    with producer(target.app) as publisher:
        poison.apply_async(producer=publisher)
    deadline = time.monotonic() + 60
    while result.state not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert result.state == "FAILURE", target.log_tail()
    assert type(result.result).__name__ == "TooManyDeliveries"
    assert "not running it again" in str(result.result)
    assert client.get(deliveries.KEY_PREFIX + result.id) is None
    with target.store() as store:
        assert all(r.source != "poison.md" for r in store.list())  # it never ran


def test_cli_submit_status_and_ingest_queue(target: Target, tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bakery.txt").write_text(BAKERY.text)
    store_flags = ["--home", str(target.settings.home)]
    flags = [*store_flags, "--press", "streaming", "--ratio", "0.25"]
    # The target's Redis, whatever this shell's KVSTORE_REDIS_URL says.
    runner = CliRunner(env={"KVSTORE_REDIS_URL": target.settings.redis_url, "KVSTORE_BROKER_URL": None})
    submitted = runner.invoke(main, ["submit", str(tmp_path / "docs"), *flags])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    waited = runner.invoke(main, ["status", job_id, "--wait", "--timeout", "120", *store_flags])
    assert waited.exit_code == 0, waited.output
    assert "1/1 done" in waited.output
    queued = runner.invoke(main, ["ingest", "--queue", str(tmp_path / "docs" / "bakery.txt"), *flags])
    assert queued.exit_code == 0, queued.output
    assert "done" in queued.output
    missing = runner.invoke(main, ["status", "no-such-job", *store_flags])
    assert missing.exit_code == 1 and "no job" in missing.output


@pytest.mark.parametrize("command", ["worker", "submit", "status"])
def test_every_queue_command_has_help_with_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"kvstore {command}" in result.output
