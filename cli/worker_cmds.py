"""Queue commands: `kvstore worker`, `kvstore submit`, `kvstore status` (and `ingest --queue`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click
from celery import Celery
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.console import make_console
from cli.options import F, compression_options, store_options
from kvstore.config import Settings
from kvstore.text.documents import DocumentError, discover, read_document
from workers.config import QUEUES, WorkerSettings
from workers.jobs import Document, JobStatus, job_status, submit, wait

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
def queue_app(home: str | None, redis_url: str | None, broker_url: str | None) -> Iterator[Celery]:
    """A client-side Celery app for these flags, closed (and the embedded Redis released) afterwards."""
    from workers.app import close_app, create_app

    settings = Settings().with_overrides(home=Path(home).expanduser() if home else None, redis_url=redis_url)
    app = create_app(settings, WorkerSettings(broker_url=broker_url) if broker_url else None)
    try:
        yield app
    finally:
        close_app(app)


# -- worker -----------------------------------------------------------------------------------------


def _gpu_count() -> int:
    """Visible GPUs, counted through NVML so the parent never initialises CUDA before forking its pool."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.device_count()


@click.command()
@click.option(
    "--queues",
    "-Q",
    default="ingest,answer",
    show_default=True,
    help="Comma-separated queues to serve: ingest, answer (or full names kvstore.ingest, kvstore.answer).",
)
@click.option("--gpu", type=int, default=None, help="Pin this worker to one GPU (sets CUDA_VISIBLE_DEVICES).")
@click.option(
    "--concurrency", "-c", type=int, default=None, help="Pool processes (default: one per visible GPU, 1 on CPU)."
)
@click.option("--model", "-m", default=None, help="Model each pool process loads at start (default KVSTORE_MODEL).")
@click.option("--name", "-n", default=None, help="Worker node name (default kvstore@HOST, kvstore-gpuN@HOST).")
@click.option(
    "--loglevel",
    "-l",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@broker_option
@store_options
def worker(
    queues: str,
    gpu: int | None,
    concurrency: int | None,
    model: str | None,
    name: str | None,
    loglevel: str,
    broker_url: str | None,
    home: str | None,
    redis_url: str | None,
) -> None:
    """Start a Celery worker that ingests documents and answers questions from the queue.

    Each pool process loads the model once and handles one task at a time (prefetch 1, late acks:
    a task whose worker dies is run again by another). Start one worker per GPU with --gpu.

    \b
    Examples:
        kvstore worker                       # all queues, one process per GPU (1 on CPU)
        kvstore worker --gpu 1 -Q ingest     # GPU 1 only, ingest queue only
        KVSTORE_REDIS_URL=redis://redis:6379/0 kvstore worker -c 2
    """
    names = [QUEUE_ALIASES.get(q.strip(), q.strip()) for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        raise click.BadParameter(f"unknown queue(s) {unknown or queues!r}: choose from ingest, answer", param_hint="-Q")
    for var, value in (
        ("KVSTORE_HOME", home),
        ("KVSTORE_REDIS_URL", redis_url),
        ("KVSTORE_BROKER_URL", broker_url),
        ("KVSTORE_MODEL", model),
    ):
        if value:
            os.environ[var] = str(Path(value).expanduser()) if var == "KVSTORE_HOME" else value
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    gpus = _gpu_count()
    processes = concurrency or (1 if gpu is not None else max(1, gpus))
    if gpus == 0:  # CPU: split the cores between pool processes instead of oversubscribing them
        os.environ.setdefault("KVSTORE_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    node = name or (f"kvstore-gpu{gpu}@%h" if gpu is not None else "kvstore@%h")
    from workers.app import app

    app.worker_main(
        [
            "worker",
            "-Q",
            ",".join(names),
            "-c",
            str(processes),
            "--prefetch-multiplier",
            "1",
            "-l",
            loglevel,
            "-n",
            node,
        ]
    )


# -- submit / status --------------------------------------------------------------------------------


def read_documents(paths: tuple[str, ...]) -> list[Document]:
    """Every supported file under `paths`; unreadable ones are reported and skipped."""
    files = discover(paths)
    documents = []
    for path in files:
        try:
            documents.append(Document(read_document(path), str(path)))
        except DocumentError as exc:
            console.print(f"[red]skipped[/] {exc}")
    if not documents:
        raise click.ClickException(f"no readable documents under {', '.join(paths)}")
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
                tokens = f" {d.tokens:,} tok" if d.tokens else ""
                part = f" part {d.part + 1}" if d.part else ""
                self.progress.update(
                    self.rows[d.task_id], completed=d.fraction, detail=f"{d.state}{part}{tokens}", visible=running
                )


def follow(app: Celery, job_id: str, timeout: float | None) -> JobStatus:
    """Wait for the job with a live progress bar; the final status."""
    total = len(job_status(app, job_id).documents)
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        return wait(app, job_id, timeout=timeout, on_update=LiveJob(progress, total))


def report(status: JobStatus) -> None:
    console.print(status_table(status))
    if status.finished and status.failed:
        raise SystemExit(1)


def submit_and_wait(
    paths: tuple[str, ...],
    overrides: Mapping[str, object],
    home: str | None,
    redis_url: str | None,
    broker_url: str | None = None,
    timeout: float | None = None,
) -> JobStatus:
    """`ingest --queue`: submit, follow to the end, print the per-document outcome."""
    documents = read_documents(paths)
    with queue_app(home, redis_url, broker_url) as app:
        job_id = submit(app, documents, overrides)
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
def submit_cmd(
    paths: tuple[str, ...],
    wait_: bool,
    model: str | None,
    press: str | None,
    ratio: float | None,
    quant: str | None,
    blob_format: str | None,
    broker_url: str | None,
    home: str | None,
    redis_url: str | None,
) -> None:
    """Queue documents for the workers (one task each) and print the job id.

    Files and folders are read here and sent as text, so workers need no access to them.
    Documents already stored with the same settings are not recomputed.

    \b
    Examples:
        JOB=$(kvstore submit docs/ --ratio 0.75)
        kvstore status $JOB --wait
    """
    overrides = {"model": model, "press": press, "ratio": ratio, "quant": quant, "blob_format": blob_format}
    documents = read_documents(paths)
    with queue_app(home, redis_url, broker_url) as app:
        job_id = submit(app, documents, overrides)
        console.print(f"{len(documents)} documents queued; follow with: kvstore status {job_id} --wait", soft_wrap=True)
        click.echo(job_id)
        if wait_:
            report(follow(app, job_id, None))


@click.command("status")
@click.argument("job_id", metavar="JOB")
@click.option("--wait", "wait_", is_flag=True, help="Show a live progress bar until the job is finished.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds (exit 2).")
@broker_option
@store_options
def status_cmd(
    job_id: str, wait_: bool, timeout: float | None, broker_url: str | None, home: str | None, redis_url: str | None
) -> None:
    """Show per-document progress of a submitted job (exit 1 when a document failed).

    \b
    Examples:
        kvstore status 6b1f0c3e-...            # one snapshot
        kvstore status 6b1f0c3e-... --wait     # live progress until done
    """
    from workers.jobs import JobNotFoundError

    with queue_app(home, redis_url, broker_url) as app:
        try:
            status = follow(app, job_id, timeout) if wait_ else job_status(app, job_id)
        except JobNotFoundError as exc:
            raise click.ClickException(str(exc)) from exc
        except TimeoutError as exc:
            console.print(status_table(job_status(app, job_id)))
            console.print(f"[yellow]{exc}[/]")
            raise SystemExit(2) from exc
    report(status)
