"""Queue commands: `kvstore worker`, `kvstore submit`, `kvstore status` (and `ingest --queue`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import make_console
from cli.errors import EXIT_PARTIAL, EXIT_TIMEOUT, EXIT_UNAVAILABLE, fail
from cli.options import (
    F,
    Finite,
    check_model,
    compression_options,
    given_compression,
    json_option,
    print_json,
    store_options,
    with_settings,
)
from kvstore.config import Compression, Settings
from kvstore.text.documents import DocumentError, discover, read_document

if TYPE_CHECKING:
    from celery import Celery

    from workers.jobs import Document, JobStatus

console = make_console(stderr=True)
QUEUE_ALIASES = {"ingest": "kvstore.ingest", "answer": "kvstore.answer"}


def broker_option(func: F) -> F:
    return click.option(
        "--broker-url",
        envvar="KVSTORE_BROKER_URL",
        default=None,
        help="Celery broker and result backend (default: --redis-url, else the embedded Redis of --home).",
    )(func)


@contextmanager
def queue_app(settings: Settings, broker_url: str | None) -> Iterator[Celery]:
    """A client-side Celery app for these settings, closed (and the embedded Redis released) afterwards.

    A broker that cannot be reached (or refuses the password) ends the command with one line, exit 3.
    """
    import redis

    from kvstore.errors import import_extra

    kombu_exceptions = import_extra("kombu.exceptions", "workers")
    from workers.celery import close_app, create_app
    from workers.config import WorkerSettings

    app = create_app(settings, WorkerSettings(broker_url=broker_url) if broker_url else None)
    try:
        app.backend.client.ping()  # fail now, in one line, rather than after Celery's reconnect loop
        yield app
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu_exceptions.OperationalError) as exc:
        where = broker_url or settings.redis_url or f"the embedded Redis in {settings.home}"
        fail(f"cannot reach the broker at {where}: {exc}", EXIT_UNAVAILABLE)
    except redis.exceptions.AuthenticationError as exc:
        fail(f"the broker refused access: {exc}", EXIT_UNAVAILABLE)
    finally:
        try:
            close_app(app)
        except Exception:  # the broker is already gone: nothing left to release
            pass


# -- worker -----------------------------------------------------------------------------------------


def _gpu_count() -> int:
    """Visible GPUs, counted through NVML so the parent never initialises CUDA before forking its pool."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.device_count()


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--queues",
    "-Q",
    default="ingest,answer",
    show_default=True,
    help="Comma-separated queues to serve: ingest, answer (or full names kvstore.ingest, kvstore.answer).",
)
@click.option("--gpu", type=click.IntRange(0), default=None, help="Pin this worker to one GPU (CUDA_VISIBLE_DEVICES).")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1),
    default=None,
    help="Pool processes (default: one per visible GPU, 1 on CPU).",
)
@click.option("--name", "-n", default=None, help="Worker node name (default kvstore@HOST, kvstore-gpuN@HOST).")
@click.option(
    "--loglevel",
    "-l",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@broker_option
@compression_options
@store_options
@with_settings
@click.pass_context
def worker(
    ctx: click.Context,
    queues: str,
    gpu: int | None,
    concurrency: int | None,
    name: str | None,
    loglevel: str,
    broker_url: str | None,
    settings: Settings,
) -> None:
    """Start a Celery worker that ingests documents and answers questions from the queue.

    Each pool process loads the model once and handles one task at a time (prefetch 1, late acks:
    a task whose worker dies is run again by another). Start one worker per GPU with --gpu.
    Any other option goes to Celery's own worker (-E, --autoscale, --max-tasks-per-child, ...);
    Celery's tools find the app as `celery -A kvstore` (e.g. `celery -A kvstore inspect active`).

    \b
    Examples:
        kvstore worker                       # all queues, one process per GPU (1 on CPU)
        kvstore worker --gpu 1 -Q ingest     # GPU 1 only, ingest queue only
        kvstore worker -c 2 -E --max-tasks-per-child 50
        KVSTORE_REDIS_URL=redis://redis:6379/0 kvstore worker
    """
    names = [QUEUE_ALIASES.get(q.strip(), q.strip()) for q in queues.split(",") if q.strip()]
    check_model(settings)
    from kvstore.errors import import_extra

    import_extra("celery", "workers")
    from workers.config import QUEUES

    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise click.BadParameter(f"unknown queue(s) {unknown or queues!r}: choose from ingest, answer", param_hint="-Q")
    # Pool processes read their settings from the environment: hand this command's settings down whole.
    exported = {"home": str(settings.home), **settings.compression.to_dict(), "redis_url": settings.redis_url}
    from kvstore.config import ENV_VARS

    for field_name, value in exported.items():
        if value is not None:
            os.environ[ENV_VARS[field_name]] = str(value)
    if broker_url:
        os.environ["KVSTORE_BROKER_URL"] = broker_url
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    gpus = _gpu_count()
    processes = concurrency or (1 if gpu is not None else max(1, gpus))
    if gpus == 0:  # CPU: split the cores between pool processes instead of oversubscribing them
        os.environ.setdefault("KVSTORE_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    node = name or (f"kvstore-gpu{gpu}@%h" if gpu is not None else "kvstore@%h")
    import_extra("celery", "workers")
    from workers.celery import app

    base = ["worker", "-Q", ",".join(names), "-c", str(processes), "--prefetch-multiplier", "1"]
    app.worker_main([*base, "-l", loglevel, "-n", node, *ctx.args])


# -- submit / status --------------------------------------------------------------------------------


def read_documents(paths: tuple[str, ...]) -> list[Document]:
    """Every supported file under `paths`; unreadable ones are reported and skipped."""
    from workers.jobs import Document

    documents = []
    for path in discover(paths):
        try:
            documents.append(Document(read_document(path), str(path)))
        except DocumentError as exc:
            console.print(f"[red]skipped[/] {exc}")
    if not documents:
        fail(f"no readable documents under {', '.join(paths)}")
    return documents


def status_table(status: JobStatus) -> Table:
    table = Table(title=f"job {status.job_id}: {status.done}/{len(status.documents)} done, {len(status.failed)} failed")
    for column in ("document", "state", "tokens", "contexts / error"):
        table.add_column(column, overflow="fold")
    for d in status.documents:
        detail = d.error or ", ".join(i[:12] for i in d.context_ids)
        style = {"failed": "red", "done": "green"}.get(d.state)
        table.add_row(d.source, d.state, f"{d.tokens:,}" if d.tokens else "-", detail, style=style)
    return table


class LiveJob:
    """A rich progress display: one bar for the job, one per document while a worker is on it."""

    def __init__(self, progress: Progress, total: int):
        self.progress = progress
        self.job = progress.add_task("job", total=total, detail="")
        self.rows: dict[str, TaskID] = {}

    def __call__(self, status: JobStatus) -> None:
        detail = f"{status.done}/{len(status.documents)} done" + (
            f", {len(status.failed)} failed" if status.failed else ""
        )
        self.progress.update(self.job, completed=status.progress, detail=detail)
        for d in status.documents:
            running = d.state != "queued" and not d.finished
            if running and d.task_id not in self.rows:
                self.rows[d.task_id] = self.progress.add_task(
                    Path(d.source).name or d.task_id[:8], total=1.0, detail=""
                )
            if d.task_id in self.rows:
                tokens = f" {d.tokens_done:,}/{d.tokens:,} tok" if d.tokens else ""
                part = f" part {d.part + 1}/{d.parts}" if d.parts > 1 else ""
                self.progress.update(
                    self.rows[d.task_id], completed=d.fraction, detail=f"{d.state}{part}{tokens}", visible=running
                )


def follow(app: Celery, job_id: str, timeout: float | None) -> JobStatus:
    """Wait for the job with a live progress bar; the final status."""
    from workers.jobs import job_status, wait

    total = len(job_status(app, job_id).documents)
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        return wait(app, job_id, timeout=timeout, on_update=LiveJob(progress, total))


def report(status: JobStatus, as_json: bool = False) -> None:
    """The per-document outcome (a table, or JSON on stdout); exit 5 when some documents failed."""
    if as_json:
        print_json(status.to_dict())
    else:
        console.print(status_table(status))
    if status.finished and status.failed:
        raise SystemExit(EXIT_PARTIAL)


def submit_and_wait(
    paths: tuple[str, ...],
    compression: Compression,
    settings: Settings,
    broker_url: str | None = None,
    timeout: float | None = None,
) -> JobStatus:
    """`ingest --queue`: submit, follow to the end, print the per-document outcome."""
    from workers.jobs import submit

    documents = read_documents(paths)
    with queue_app(settings, broker_url) as app:
        job_id = submit(app, documents, compression)
        console.print(f"job [bold]{job_id}[/]: {len(documents)} documents queued")
        status = follow(app, job_id, timeout)
    report(status)
    return status


@click.command("submit")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--wait", "wait_", is_flag=True, help="Follow the job until every document is done.")
@compression_options
@broker_option
@store_options
@with_settings
def submit_cmd(paths: tuple[str, ...], wait_: bool, broker_url: str | None, settings: Settings) -> None:
    """Queue documents for the workers (one task each) and print the job id.

    Files and folders are read here and sent as text, so workers need no access to them.
    Documents already stored with the same settings are not recomputed. Compression flags given
    here travel with the job; the workers' own settings fill in the rest.

    \b
    Examples:
        JOB=$(kvstore submit docs/ --ratio 0.75)
        kvstore status $JOB --wait
    """
    from workers.jobs import submit

    documents = read_documents(paths)
    with queue_app(settings, broker_url) as app:
        job_id = submit(app, documents, given_compression())
        console.print(f"{len(documents)} documents queued; follow with: kvstore status {job_id} --wait", soft_wrap=True)
        click.echo(job_id)
        if wait_:
            report(follow(app, job_id, None))


@click.command("status")
@click.argument("job_id", metavar="JOB")
@click.option("--wait", "wait_", is_flag=True, help="Show a live progress bar until the job is finished.")
@click.option(
    "--timeout", type=Finite(0.0), default=None, help="With --wait: give up after this many seconds (exit 4)."
)
@json_option
@broker_option
@store_options
@with_settings
def status_cmd(
    job_id: str, wait_: bool, timeout: float | None, as_json: bool, broker_url: str | None, settings: Settings
) -> None:
    """Show per-document progress of a submitted job (exit 5 when a document failed).

    \b
    Examples:
        kvstore status 6b1f0c3e-...            # one snapshot
        kvstore status 6b1f0c3e-... --wait     # live progress until done
        kvstore status 6b1f0c3e-... --json
    """
    from workers.jobs import JobNotFoundError, job_status

    with queue_app(settings, broker_url) as app:
        try:
            status = follow(app, job_id, timeout) if wait_ else job_status(app, job_id)
        except JobNotFoundError as exc:
            fail(str(exc))
        except TimeoutError as exc:
            report_now = job_status(app, job_id)
            if as_json:
                print_json(report_now.to_dict())
            else:
                console.print(status_table(report_now))
            fail(str(exc), EXIT_TIMEOUT)
    report(status, as_json)
