"""The CLI for scripts: JSON output, distinct exit codes, completion, and commands that start fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.errors import EXIT_ERROR, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE
from cli.main import main
from kvstore.storage.store import ContextMeta, ContextStore
from tests.factories import PRESS, random_compressed


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def stored(store_home: Path) -> list[str]:
    """Two synthetic contexts in the store (no model needed to list, show or remove them)."""
    with ContextStore.open() as store:
        ids = []
        for seed in (1, 2):
            meta = ContextMeta("tiny", "fp", "tok", PRESS, source=f"doc{seed}.txt")
            ids.append(store.put(random_compressed(seed=seed), meta)[0].id)
    return ids


def test_json_output_for_ls_show_and_stats(stored: list[str]) -> None:
    listing = run("ls", "--json")
    assert listing.exit_code == 0, listing.output
    assert sorted(r["id"] for r in json.loads(listing.output)) == sorted(stored)
    shown = json.loads(run("show", stored[0][:10], "--json").output)
    assert [r["id"] for r in shown] == [stored[0]] and shown[0]["source"] == "doc1.txt"
    totals = json.loads(run("stats", "--json").output)
    assert totals["contexts"] == 2 and 0.0 < totals["saving"] < 1.0


def test_exit_codes_are_distinct_and_documented(stored: list[str]) -> None:
    assert run("show", "feedfacecafe").exit_code == EXIT_ERROR  # nothing found
    assert run("ls", "--limit", "0").exit_code == EXIT_USAGE  # a bad value for an option
    assert run("ls", "--redis-url", "redis://127.0.0.1:1").exit_code == EXIT_UNAVAILABLE
    help_text = run("--help").output
    for code in ("0  success", "3  a service is unreachable", "4  status --wait --timeout", "5  finished"):
        assert code in help_text


def test_status_timeout_is_its_own_exit_code(store_home: Path) -> None:
    from workers import jobs
    from workers.celery import close_app, create_app

    app = create_app()
    try:  # a job no worker serves: it stays queued
        job_id = jobs.submit(app, [jobs.Document("some text", "a.txt")])
    finally:
        close_app(app)
    waited = run("status", job_id, "--wait", "--timeout", "1")
    assert waited.exit_code == EXIT_TIMEOUT and "not finished" in waited.output
    snapshot = json.loads(run("status", job_id, "--json").output)
    assert snapshot["job_id"] == job_id and snapshot["documents"][0]["state"] == "queued"


def test_context_ids_complete_in_the_shell(stored: list[str], store_home: Path) -> None:
    prefix = stored[0][:3]
    env = {"_KVSTORE_COMPLETE": "bash_complete", "COMP_WORDS": f"kvstore show {prefix}", "COMP_CWORD": "2"}
    result = CliRunner().invoke(main, [], env=env, prog_name="kvstore")
    offered = {line.split(",", 1)[1] for line in result.output.splitlines() if line.startswith("plain,")}
    assert offered == {i for i in stored if i.startswith(prefix)}


LIGHT = [
    ["--help"],
    ["status", "no-such-job"],
    ["submit", "--help"],
    ["ls"],
    ["show", "STORED"],
    ["stats"],
    ["search", "which document"],
    ["gc", "--grace", "0"],
    ["reindex"],
    ["rm", "STORED"],
]


@pytest.mark.parametrize("args", LIGHT, ids=lambda a: " ".join(a))
def test_light_commands_never_import_torch(args: list[str], stored: list[str]) -> None:
    args = [stored[0] if a == "STORED" else a for a in args]
    probe = (
        "import sys\nfrom cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
    assert "LOADED []" in done.stdout and "Traceback" not in done.stderr, (done.stdout + done.stderr)[-800:]


MODEL_COMMANDS = [
    ["ingest", "DOC"],
    ["ask", "deadbeefcafe", "q"],
    ["serve"],
    ["eval", "--n", "1"],
    ["bench", "--lengths", "100"],
    ["worker"],
]


@pytest.mark.parametrize("args", MODEL_COMMANDS, ids=lambda a: a[0])
def test_an_unknown_model_fails_in_one_line_before_torch_loads(
    args: list[str], store_home: Path, tmp_path: Path
) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("The door is green.")
    args = [str(doc) if a == "DOC" else a for a in args]
    probe = (
        "import sys\nfrom cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
        "    code = exc.code\nprint('LOADED', sorted(m for m in ('torch', 'transformers') if m in sys.modules), code)"
    )
    command = [sys.executable, "-c", probe, *args, "--model", "no/such-model"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "LOADED [] 1" in done.stdout, (done.stdout + done.stderr)[-800:]
    assert done.stderr.strip().splitlines() == [
        "Error: model 'no/such-model' is not in the local Hugging Face cache and the hub cannot be reached"
    ]
