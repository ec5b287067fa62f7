"""A real S3-protocol server for tests: moto in server mode on 127.0.0.1, and a cuttable proxy in front.

The proxy stands in for a network or server that goes away: `cut()` closes every connection and
refuses new ones (the client sees the server stopped) while moto keeps its objects, so a retry
after `resume()` talks to the same bucket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kvstore-test", "AWS_SECRET_ACCESS_KEY": "kvstore-test-secret"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a process needs to use this server: the standard AWS variables only."""
        return {**CREDENTIALS, "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def client(self):  # noqa: ANN201 (a boto3 S3 client, talking to moto directly)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def bucket(self) -> str:
        name = f"kvstore-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Proxy:
    """A TCP relay 127.0.0.1:port -> target port that can be cut and resumed.

    Setting `budget` cuts it once that many more bytes went from the client to the server (mid-upload).
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.budget: int | None = None
        self.port = free_port()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.resume()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resume(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every relayed connection: the server is gone."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open += [client, upstream]
            for a, b, upload in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, upload), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        try:
            while data := source.recv(65536):
                if upload and self.budget is not None:
                    self.budget -= len(data)
                    if self.budget <= 0:
                        self.budget = None
                        self.cut()
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def aws_env(server: MotoServer, endpoint: str | None = None) -> dict[str, str]:
    """os.environ for a child process using `server` (no AWS settings of the machine leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **server.env(endpoint)}
