"""The HTTP API against a real uvicorn process, driven by the official `openai` client."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from kvstore import KVStore
from tests.tiny import sample_text

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
BODY_LIMIT = 50 * 2**10  # the module's server: request bodies (`--max-request-mb`)
DOCUMENT_LIMIT = 10 * 2**10  # and documents (KVSTORE_MAX_DOCUMENT_MB)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    model: str
    home: Path
    process: subprocess.Popen

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, key: str = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def start_server(home: Path, model: str, *flags: str, env: dict[str, str] | None = None) -> Server:
    port = _free_port()
    environ = {**os.environ, "KVSTORE_HOME": str(home), "KVSTORE_MODEL": model, "KVSTORE_API_KEY": KEY, **(env or {})}
    environ.pop("KVSTORE_REDIS_URL", None)
    command = [sys.executable, "-c", "from cli.main import main; main()", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", model, home, process)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("served-store")
    limits = {"KVSTORE_MAX_DOCUMENT_MB": str(DOCUMENT_LIMIT / 2**20)}
    running = start_server(home, str(tiny_dir), "--max-request-mb", str(BODY_LIMIT / 2**20), env=limits)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def ids(server: Server) -> list[str]:
    with server.http() as http:
        made = []
        for seed in (1, 2, 3):
            response = http.post("/v1/contexts", json={"text": sample_text(60, seed=seed), "source": f"doc{seed}"})
            assert response.status_code == 201, response.text
            made.append(response.json()["data"][0]["id"])
    return made


@pytest.fixture(scope="module")
def local(server: Server, ids: list[str]) -> Iterator[KVStore]:
    """The same store and model in this process: what the server's answers must equal."""
    with KVStore(home=server.home, model=server.model) as kv:
        yield kv


def _ask(server: Server, question: str, max_tokens: int = 8, **extra: object) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, extra_body=extra
    )


def test_a_plain_completion_in_the_openai_format(server: Server, ids: list[str], local: KVStore) -> None:
    reply = _ask(server, "the vault", contexts=[ids[0][:12]])
    expected = local.ask(ids[0], "the vault", max_new_tokens=8)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert [c["id"] for c in reply.model_extra["contexts"]] == [ids[0]]


def test_a_streamed_completion_joins_into_the_same_answer(server: Server, ids: list[str]) -> None:
    plain = _ask(server, "users", contexts=[ids[1]]).choices[0].message.content
    stream = server.client().chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "users"}],
        max_tokens=8,
        stream=True,
        extra_body={"contexts": [ids[1]]},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert [c["id"] for c in chunks[-1].model_extra["contexts"]] == [ids[1]]


def test_several_contexts_are_composed_into_one_answer(server: Server, ids: list[str], local: KVStore) -> None:
    reply = _ask(server, "the vault", contexts=ids)
    assert reply.choices[0].message.content == local.ask(ids, "the vault", max_new_tokens=8)
    assert [c["id"] for c in reply.model_extra["contexts"]] == ids
    retrieved = _ask(server, "vault passcode", retrieve={"k": 2})
    assert 1 <= len(retrieved.model_extra["contexts"]) <= 2


def test_errors_come_in_the_openai_shape_with_the_right_status(server: Server, ids: list[str]) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        _ask(server, "anything?", contexts=["feedfacecafe"])
    assert missing.value.status_code == 404 and missing.value.body["type"] == "not_found_error"
    assert "feedfacecafe" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        _ask(server, "anything?", contexts=["/etc/passwd"])  # paths are never read on a caller's behalf
    with pytest.raises(openai.AuthenticationError) as denied:
        server.client("wrong-key").chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "q"}], extra_body={"contexts": ids[:1]}
        )
    assert denied.value.status_code == 401
    with pytest.raises(openai.APIStatusError) as too_big:
        _ask(server, "word " * 20_000, contexts=ids[:1])
    assert too_big.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        _ask(server, "no contexts named")
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        server.client().chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "q"}],
            max_tokens=100_000,
            extra_body={"contexts": ids[:1]},
        )
    with pytest.raises(openai.NotFoundError, match="not served here"):
        server.client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "q"}], extra_body={"contexts": ids[:1]}
        )


def test_eight_concurrent_questions_equal_the_same_questions_one_by_one(server: Server, ids: list[str]) -> None:
    questions = ["the vault", "users", "blue whale", "startups", "fox", "secret", "numbers", "weeks"]
    one_by_one = [_ask(server, q, contexts=[ids[2]]).choices[0].message.content for q in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: _ask(server, q, contexts=[ids[2]]).choices[0].message.content, questions))
    assert together == one_by_one
    assert httpx.get(f"{server.url}/healthz").json()["largest_batch"] > 1  # they shared decode steps


def test_models_contexts_and_health_endpoints(server: Server, ids: list[str]) -> None:
    with server.http() as http:
        assert http.get("/healthz").json()["status"] == "ok"
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [server.model]
        listed = {c["id"] for c in http.get("/v1/contexts").json()["data"]}
        assert set(ids) <= listed
        found = http.get("/v1/contexts", params={"q": "vault"}).json()["data"]
        assert found and all(c["score"] > 0 for c in found)
        assert http.get(f"/v1/contexts/{ids[0][:10]}").json()["data"][0]["id"] == ids[0]
        extra = http.post("/v1/contexts", json={"text": sample_text(30, seed=77), "source": "tmp"}).json()["data"][0]
        assert http.delete(f"/v1/contexts/{extra['id']}").json()["data"][0]["deleted"] is True
        assert http.get(f"/v1/contexts/{extra['id']}").status_code == 404
        assert http.post("/v1/contexts", json={"text": ""}).status_code == 400  # nothing stored
        assert {c["id"] for c in http.get("/v1/contexts").json()["data"]} == listed
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # no key


def _stream(server: Server, question: str, contexts: list[str], **params: object) -> tuple[str, str | None]:
    """A streamed completion's joined text and final finish_reason."""
    chunks = list(
        server.client().chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": question}],
            stream=True,
            extra_body={"contexts": contexts},
            **params,
        )
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(server: Server, ids: list[str]) -> None:
    full = _ask(server, "the vault", max_tokens=16, contexts=[ids[0]]).choices[0].message.content
    word = re.search(r"[A-Za-z]{3,}", full)
    assert word, f"no word in {full!r} to stop at"
    stop = word.group()
    expected = full[: full.find(stop)].strip()
    stops = [stop, "never-generated"]
    stopped = server.client().chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "the vault"}],
        max_tokens=16,
        stop=stops,
        extra_body={"contexts": [ids[0]]},
    )
    assert stopped.choices[0].message.content == expected and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 16  # decoding ended at the stop string
    assert _stream(server, "the vault", [ids[0]], max_tokens=16, stop=stops) == (expected, "stop")
    assert _stream(server, "the vault", [ids[0]], max_tokens=16, stop=stop) == (expected, "stop")  # a bare string


def test_sampling_repeats_with_a_seed_and_temperature_zero_is_greedy(
    server: Server, ids: list[str], local: KVStore
) -> None:
    def ask(**params: object) -> str:
        return (
            server.client()
            .chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "users"}],
                max_tokens=8,
                extra_body={"contexts": [ids[1]]},
                **params,
            )
            .choices[0]
            .message.content
        )

    sampled = ask(temperature=1.0, seed=7)
    assert sampled == local.ask(ids[1], "users", max_new_tokens=8, temperature=1.0, seed=7)
    with ThreadPoolExecutor(4) as pool:  # asked together: each still decodes as if alone
        together = list(pool.map(lambda _: ask(temperature=1.0, seed=7), range(4)))
    assert together == [sampled] * 4
    greedy = local.ask(ids[1], "users", max_new_tokens=8)
    assert ask(temperature=0) == ask() == greedy
    assert sampled != greedy  # the temperature was not ignored (a random tiny model samples far from its argmax)


def test_system_messages_and_earlier_turns_fold_into_the_question(
    server: Server, ids: list[str], local: KVStore
) -> None:
    messages = [
        {"role": "system", "content": "  Answer in one word.  "},
        {"role": "user", "content": "Where is the vault?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Behind the fox."}]},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "And the passcode?"},
    ]
    reply = server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=8, extra_body={"contexts": [ids[0]]}
    )
    folded = (
        "Answer in one word.\n\nBe brief.\n\nUser: Where is the vault?\n\nAssistant: Behind the fox.\n\n"
        "And the passcode?"
    )
    expected = local.ask(ids[0], folded, max_new_tokens=8)
    assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == expected.prompt_tokens
    malformed = {
        "the last message must be the user's": [*messages, {"role": "assistant", "content": "Done."}],
        "question .* is empty": [{"role": "user", "content": "  "}],
        "messages.0.role": [{"role": "tool", "content": "42", "tool_call_id": "call_1"}, messages[-1]],
        "messages.1.role": [messages[0], {"role": "narrator", "content": "q"}],
        "messages.0.content": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}
        ],
    }
    for message, bad in malformed.items():
        with pytest.raises(openai.BadRequestError, match=message) as refused:
            server.client().chat.completions.create(
                model=server.model, messages=bad, max_tokens=8, extra_body={"contexts": [ids[0]]}
            )
        assert refused.value.body["type"] == "invalid_request_error"


def test_a_document_over_the_size_limit_gets_413_and_stores_nothing(server: Server, ids: list[str]) -> None:
    with server.http() as http:
        before = http.get("/v1/contexts").json()["data"]
        too_long = http.post("/v1/contexts", json={"text": "vault " * (DOCUMENT_LIMIT // 6 + 1), "source": "long"})
        assert too_long.status_code == 413, too_long.text
        error = too_long.json()["error"]
        assert error["code"] == "document_too_large" and f"{DOCUMENT_LIMIT:,}-byte limit" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        too_big = http.post("/v1/contexts", json={"text": "vault " * (BODY_LIMIT // 6 + 1)})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert http.get("/v1/contexts").json()["data"] == before


def test_a_cold_context_loading_does_not_stall_a_running_generation(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cold context's preparation blocks until the hot generation has finished: the hot generation
    must run to its end meanwhile (before, preparing on the decoding thread, it never could)."""
    from kvstore.config import Settings
    from kvstore.decode.generation import GenerationOptions, decode_rows
    from kvstore.server import engine as engine_module
    from kvstore.server.engine import Engine, Job

    settings = Settings(home=tmp_path, model=str(tiny_dir), redis_url=None)
    questions = {"hot": "the vault", "cold": "users"}
    with KVStore(settings) as kv:
        refs = {
            name: kv.ingest_text(sample_text(60, seed=seed))[0].record.id for name, seed in [("hot", 4), ("cold", 5)]
        }
        expected = {name: kv.ask(refs[name], questions[name], max_new_tokens=8) for name in refs}
    cold_loading, hot_done = threading.Event(), threading.Event()
    hot_ran_during_the_cold_load: list[bool] = []

    class SlowColdContext(KVStore):
        def prepare(self, refs_: object, questions_: list[str], options: object = None) -> object:
            if refs_ == [refs["cold"]]:  # a blob read and composition that last as long as the hot generation
                cold_loading.set()
                hot_ran_during_the_cold_load.append(hot_done.wait(30))
            return super().prepare(refs_, questions_, options)

    def hot_steps_once_the_cold_load_began(*args: object) -> Iterator:
        for rows in decode_rows(*args):
            if args[2] == [questions["hot"]]:
                cold_loading.wait(30)  # so the hot generation cannot end before the cold load begins
            yield rows

    monkeypatch.setattr(engine_module, "decode_rows", hot_steps_once_the_cold_load_began)
    engine = Engine(lambda: SlowColdContext(settings, untrusted_refs=True))
    engine.start()
    answers: dict[str, object] = {}
    finished = {name: threading.Event() for name in refs}

    def on_done(name: str) -> Callable[[object, BaseException | None], None]:
        def done(answer: object, error: BaseException | None) -> None:
            answers[name] = answer if error is None else error
            finished[name].set()
            if name == "hot":
                hot_done.set()

        return done

    try:
        assert engine.ready.wait(120) and engine.error is None
        for name in ("hot", "cold"):
            engine.submit(Job(questions[name], GenerationOptions(8), refs=[refs[name]], on_done=on_done(name)))
        assert finished["hot"].wait(90) and finished["cold"].wait(90)
    finally:
        engine.stop()
        engine.client.close()
    assert hot_ran_during_the_cold_load == [True]
    assert answers == expected


def test_a_broken_decoding_thread_fails_its_requests_instead_of_leaving_them_waiting(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvstore import KVStore
    from kvstore.config import Settings
    from kvstore.decode.generation import GenerationOptions
    from kvstore.server.engine import Engine, Job

    settings = Settings(home=tmp_path, model=str(tiny_dir), redis_url=None)
    with KVStore(settings) as kv:
        ref = kv.ingest_text(sample_text(60, seed=6))[0].record.id

    def broken(self: Engine, waiting: list, running: list) -> None:
        raise RuntimeError("a bug in batching")

    monkeypatch.setattr(Engine, "_start_batches", broken)
    engine = Engine(lambda: KVStore(settings, untrusted_refs=True))
    engine.start()
    outcomes: list[BaseException | None] = []
    told = threading.Event()

    def on_done(answer: object, error: BaseException | None) -> None:
        outcomes.append(error)
        told.set()

    try:
        assert engine.ready.wait(120) and engine.error is None
        engine.submit(Job("the vault", GenerationOptions(4), refs=[ref], on_done=on_done))
        assert told.wait(60), "the request was left waiting"
        assert "a bug in batching" in str(outcomes[0]) and "a bug in batching" in str(engine.error)
        told.clear()
        engine.submit(Job("again", GenerationOptions(4), refs=[ref], on_done=on_done))  # refused at once now
        assert told.wait(60) and "cannot answer" in str(outcomes[1])
    finally:
        engine.stop()
        engine.client.close()


def test_a_failed_part_rolls_back_the_parts_stored_before_it(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    import kvstore.ingest
    from kvstore.config import Settings
    from kvstore.server.app import create_app
    from kvstore.storage.blob import BlobError
    from kvstore.storage.store import ContextStore

    settings = Settings(home=tmp_path, model=str(tiny_dir), redis_url=None)
    monkeypatch.setattr(kvstore.ingest, "max_document_tokens", lambda loaded: 150)  # a short text in several parts
    text = "\n\n".join(sample_text(60, seed=i) for i in range(4))
    put, calls = ContextStore.put, []

    def third_part_fails(self: ContextStore, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise BlobError("could not store context: no space left on device")
        return put(self, *args, **kwargs)

    with TestClient(create_app(settings)) as http:
        for _ in range(600):
            if http.get("/healthz").status_code == 200:
                break
            time.sleep(0.1)
        with monkeypatch.context() as faults:
            faults.setattr(ContextStore, "put", third_part_fails)
            failed = http.post("/v1/contexts", json={"text": text, "source": "long.txt"})
        assert failed.status_code == 500 and "no space left" in failed.json()["error"]["message"]
        assert len(calls) == 3
        with ContextStore.open(settings) as store:
            assert store.list() == [] and store.texts.ids() == [] and list(store.backend.list()) == []
        stored = http.post("/v1/contexts", json={"text": text, "source": "long.txt"})
        assert stored.status_code == 201, stored.text
        parts = stored.json()["data"]
        assert len(parts) > 3 and all(p["created"] for p in parts)


def test_binding_beyond_the_loopback_needs_an_api_key(tiny_dir: Path, tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "KVSTORE_API_KEY"}
    command = [sys.executable, "-c", "from cli.main import main; main()", "serve", "--host", "0.0.0.0"]
    done = subprocess.run(command, cwd=ROOT, env={**environ, "KVSTORE_HOME": str(tmp_path)}, capture_output=True)
    assert done.returncode == 1 and b"KVSTORE_API_KEY" in done.stderr


@pytest.mark.model
def test_the_default_model_answers_a_served_question(tmp_path: Path) -> None:
    running = start_server(tmp_path / "store", "smollm2-135m")
    try:
        with running.http() as http:
            text = (ROOT / "examples" / "docs" / "lighthouse.md").read_text()
            [part] = http.post("/v1/contexts", json={"text": text, "source": "lighthouse.md"}).json()["data"]
        reply = running.client().chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What color is the lighthouse door?"}],
            max_tokens=24,
            extra_body={"contexts": [part["id"]]},
        )
        assert "green" in reply.choices[0].message.content.lower()
    finally:
        stop_server(running)


def test_requests_get_503_while_the_model_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import threading

    from fastapi.testclient import TestClient

    from kvstore.config import Settings
    from kvstore.server import app as app_module

    release = threading.Event()

    class SlowClient:
        def __init__(self, *args: object, **kwargs: object):
            release.wait(30)
            raise RuntimeError("no model in this test")

    monkeypatch.setattr(app_module, "KVStore", SlowClient)
    app = app_module.create_app(Settings(home=tmp_path, redis_url=None))
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 503
        loading = http.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "q"}]})
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "loading"
        release.set()
        for _ in range(100):
            if http.get("/healthz").json()["status"] == "error":
                break
            time.sleep(0.05)
        assert http.get("/v1/models").status_code == 200
        failed = http.get("/v1/contexts")
        assert failed.status_code == 503 and "cannot answer" in failed.json()["error"]["message"]


def test_with_a_queue_a_posted_text_becomes_a_job_for_the_workers(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from cli.serve_cmd import queue_submitter
    from kvstore.config import Settings
    from kvstore.server.app import create_app
    from workers import jobs
    from workers.celery import close_app
    from workers.celery import create_app as celery_app

    monkeypatch.delenv("KVSTORE_BROKER_URL", raising=False)
    settings = Settings(home=tmp_path, model=str(tiny_dir), redis_url=None)
    with TestClient(create_app(settings, submit=queue_submitter(settings))) as http:
        for _ in range(600):
            if http.get("/healthz").status_code == 200:
                break
            time.sleep(0.1)
        queued = http.post("/v1/contexts", json={"text": "The door is green.", "source": "door.md"})
        assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text
        assert http.get("/v1/contexts").json()["data"] == []  # queued, not ingested here
        app = celery_app(settings)  # no worker serves this broker: the job waits in the queue
        try:
            status = jobs.job_status(app, queued.json()["id"])
        finally:
            close_app(app)
    assert [(d.source, d.state) for d in status.documents] == [("door.md", "queued")]
