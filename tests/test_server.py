"""The HTTP API against a real uvicorn process, driven by the official `openai` client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
    running = start_server(home, str(tiny_dir), "--max-request-mb", "0.05")
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


def _ask(server: Server, question: str, **extra: object) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": question}], max_tokens=8, extra_body=extra
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
        assert failed.status_code == 503 and "could not be loaded" in failed.json()["error"]["message"]


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
