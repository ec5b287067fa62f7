"""The object store under faults, and two hosts sharing nothing but a Redis URL and a bucket URL.

Everything runs against real servers the tests start on 127.0.0.1: moto (S3 protocol), a TCP proxy in
front of it that can be cut like a server going away, and redis-server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.errors import EXIT_UNAVAILABLE
from cli.main import main
from kvstore.storage.backends import BackendUnavailableError, open_backend
from kvstore.storage.index import ContextIndex
from kvstore.storage.store import ContextStore, context_id
from tests.factories import PRESS, random_compressed
from tests.s3 import MotoServer, Proxy, aws_env
from tests.stores import RedisServer, make_meta

REPO = Path(__file__).resolve().parents[1]
KVSTORE = str(Path(sys.executable).with_name("kvstore"))


@pytest.fixture
def proxied(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    proxy = Proxy(moto_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # read when a backend is opened
    yield proxy
    proxy.cut()


@pytest.mark.parametrize("blob_format", ["safetensors", "zarr"])
def test_server_stopped_mid_upload_leaves_nothing_and_a_retry_works(
    moto_server: MotoServer, proxied: Proxy, tmp_path: Path, blob_format: str
) -> None:
    blobs = f"s3://{moto_server.bucket()}/store"
    home = tmp_path / "home"
    compressed = random_compressed(layers=4, kv_heads=3, head_dim=64, length=1500)  # a few MB
    cid = context_id("fp-a", compressed.token_ids, PRESS, "none")
    with ContextStore(home, ContextIndex.open(None, home), backend=open_backend(blobs, home)) as store:
        proxied.budget = 400_000  # the server goes away after this much of the upload
        with pytest.raises(BackendUnavailableError, match=r"cannot reach the object store for s3://") as failed:
            store.put(compressed, make_meta(), blob_format=blob_format)
        assert "\n" not in str(failed.value) and "kvstore-test-secret" not in str(failed.value)
        assert store.get(cid) is None and store.list() == []
        direct = open_backend(blobs, home)  # still the proxy's endpoint: cut
        with pytest.raises(BackendUnavailableError):
            list(direct.list())
        proxied.resume()
        assert [e.complete for e in store.backend.list()] in ([], [False])  # at most an unfinished tree
        record, created = store.put(compressed, make_meta(), blob_format=blob_format)
        assert created and record.id == cid
        assert torch.equal(store.load(cid).layers[3].values, compressed.layers[3].values)


def test_an_unreachable_object_store_is_exit_code_3(moto_server: MotoServer, proxied: Proxy, tmp_path: Path):
    blobs = f"s3://{moto_server.bucket()}/store"
    proxied.cut()
    result = CliRunner().invoke(main, ["ls", "--home", str(tmp_path / "home"), "--blobs", blobs])
    assert result.exit_code == EXIT_UNAVAILABLE and "object store" in result.output
    assert "Traceback" not in result.output and "kvstore-test-secret" not in result.output


# -- two hosts ---------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    from tests.tiny import tiny_model

    loaded = tiny_model("llama", seed=5)
    folder = tmp_path / "tiny-model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


DOCUMENTS = {
    "vault.txt": "The vault keeps its secret passcode behind the lazy dog. " * 6,
    "founders.txt": "Founders talk to users, write code, and measure what matters every week. " * 6,
}


def test_a_worker_host_ingests_and_a_client_host_answers_sharing_only_two_urls(
    moto_server: MotoServer, tmp_path: Path, tiny_dir: Path
) -> None:
    redis_server = RedisServer(tmp_path)
    try:
        blobs = f"s3://{moto_server.bucket()}/contexts"
        shared = {"KVSTORE_REDIS_URL": redis_server.url, "KVSTORE_BLOBS": blobs}
        common = {
            **{k: v for k, v in aws_env(moto_server).items() if not k.startswith("KVSTORE_")},
            **shared,
            "PYTHONPATH": str(REPO),
            "KVSTORE_MODEL": str(tiny_dir),
            "KVSTORE_PRESS": "streaming",
            "KVSTORE_RATIO": "0.5",
            "KVSTORE_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
        }
        docs = tmp_path / "docs"
        docs.mkdir()
        for name, text in DOCUMENTS.items():
            (docs / name).write_text(text)
        worker_home, client_home = tmp_path / "worker-host", tmp_path / "client-host"
        worker_env = {**common, "KVSTORE_HOME": str(worker_home)}
        client_env = {**common, "KVSTORE_HOME": str(client_home)}

        worker = subprocess.Popen(
            [KVSTORE, "worker", "-c", "1", "-l", "warning"],
            env=worker_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            submitted = subprocess.run(
                [KVSTORE, "ingest", "--queue", str(docs)], env=worker_env, capture_output=True, text=True, timeout=300
            )
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        finally:
            worker.terminate()
            worker.wait(60)

        def client(*args: str) -> str:
            done = subprocess.run([KVSTORE, *args], env=client_env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        listed = json.loads(client("ls", "--json"))
        assert sorted(Path(r["source"]).name for r in listed) == sorted(DOCUMENTS)
        ids = [r["id"] for r in listed]
        answers = json.loads(client("ask", ids[0], "What does the vault keep?", "--max-new-tokens", "6", "--json"))
        assert answers[0]["contexts"] == [ids[0]] and answers[0]["completion_tokens"] > 0
        assert not list((client_home / "blobs").rglob("*.safetensors"))  # nothing of the contexts is local
        expected = subprocess.run(  # the worker host asks the same: the same blob, the same answer
            [KVSTORE, "ask", ids[0], "What does the vault keep?", "--max-new-tokens", "6", "--json"],
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert json.loads(expected.stdout)[0]["answer"] == answers[0]["answer"]
    finally:
        redis_server.stop()


@pytest.mark.parametrize("bad", ["ftp://host/x", "s3://", "s3:///prefix", "gs://bucket"])
def test_a_blobs_url_kvstore_cannot_use_is_refused_where_it_enters(bad: str) -> None:
    from kvstore.config import Settings, SettingsError

    with pytest.raises(SettingsError, match="KVSTORE_BLOBS"):
        Settings(blobs=bad)
    assert Settings(blobs="s3://bucket/some/prefix").blobs == "s3://bucket/some/prefix"
    assert Settings(blobs="").blobs is None
