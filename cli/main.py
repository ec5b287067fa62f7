"""The `kvstore` command line: a thin click layer over the kvstore library."""

from __future__ import annotations

import click
import transformers

from cli.bench_cmd import bench
from cli.context_cmds import ask, gc, list_contexts, remove, show, stats
from cli.errors import FriendlyGroup
from cli.eval_cmd import evaluate_command, report_command
from cli.ingest_cmd import ingest
from cli.worker_cmds import status_cmd, submit_cmd, worker


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvstore")
def main() -> None:
    """kvstore: prefill documents once, store their compressed KV caches, answer many questions.

    \b
    Quick start:
        kvstore ingest docs/
        kvstore ls
        kvstore ask docs/report.md "What was the revenue in 2023?"

    Settings come from flags or env vars: KVSTORE_HOME (store folder, default ~/.kvstore),
    KVSTORE_REDIS_URL (shared index; default embedded Redis), KVSTORE_MODEL, KVSTORE_PRESS,
    KVSTORE_RATIO, KVSTORE_QUANT, KVSTORE_FORMAT, KVSTORE_DEVICE.
    """
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


COMMANDS = (
    ingest,
    list_contexts,
    show,
    ask,
    remove,
    gc,
    stats,
    evaluate_command,
    report_command,
    bench,
    worker,
    submit_cmd,
    status_cmd,
)
for command in COMMANDS:
    main.add_command(command)
