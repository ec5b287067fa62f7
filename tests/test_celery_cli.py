"""Celery's conventions: `celery -A kvstore` finds the app, and `kvstore worker` hands Celery's own flags on.

Nothing here reaches a broker or starts a worker: the broker URL points at a closed port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from celery.bin.base import CLIContext
from celery.bin.worker import worker as celery_worker
from click.testing import CliRunner

from cli.main import main

CELERY = str(Path(sys.executable).with_name("celery"))
NO_BROKER = "redis://127.0.0.1:1/0"


def test_the_app_is_found_by_the_package_name_without_loading_celery_on_import(store_home: Path) -> None:
    probe = (
        "import sys, kvstore\n"
        "assert 'celery' not in sys.modules, 'import kvstore loaded Celery'\n"
        "from celery.app.utils import find_app\n"
        "import workers.celery\n"
        "assert find_app('kvstore') is workers.celery.app\n"
        "print('found')"
    )
    env = {**os.environ, "KVSTORE_BROKER_URL": NO_BROKER}
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert found.stdout.strip() == "found", found.stderr[-800:]
    # Celery's own command line resolves -A before any subcommand (no broker round trip for --help).
    helped = subprocess.run([CELERY, "-A", "kvstore", "inspect", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "inspect" in helped.stdout, helped.stderr[-800:]


def test_kvstore_worker_hands_celery_its_own_flags(store_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.celery import app

    monkeypatch.setattr(os, "environ", os.environ.copy())  # the command exports its settings for the pool
    monkeypatch.setenv("KVSTORE_BROKER_URL", NO_BROKER)
    handed: list[list[str]] = []
    monkeypatch.setattr(app, "worker_main", handed.append)
    flags = ["-Q", "ingest", "--concurrency", "3", "--loglevel", "debug", "-E", "--max-tasks-per-child", "5"]
    result = CliRunner().invoke(main, ["worker", *flags, "--without-gossip"])
    assert result.exit_code == 0, result.output
    [argv] = handed
    assert argv[0] == "worker"
    # Parsed by Celery's own worker command, exactly as `celery worker` would read them.
    parent = click.Context(click.Command("celery"), obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    params = celery_worker.make_context("worker", argv[1:], parent=parent).params
    assert params["queues"] == ["kvstore.ingest"] and params["concurrency"] == 3 and params["loglevel"] == 10
    assert params["task_events"] and params["max_tasks_per_child"] == 5 and params["without_gossip"]
    assert params["prefetch_multiplier"] == 1 and params["hostname"].startswith("kvstore@")
