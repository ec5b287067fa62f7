"""The `kvstore` command line: a thin click layer over the kvstore library.

Command modules import only click, rich and kvstore's light modules at import time; each command
imports the heavy parts (torch, transformers, Celery) when it runs, so `kvstore --help`, `ls`,
`show`, `rm`, `gc`, `reindex`, `stats`, `search`, `status` and `submit` start in well under a second.
"""

from __future__ import annotations

import click

from cli.bench_cmd import bench
from cli.context_cmds import ask, gc, list_contexts, reindex, remove, search, show, stats
from cli.errors import EXIT_CODES_HELP, FriendlyGroup
from cli.eval_cmd import evaluate_command, report_command
from cli.ingest_cmd import ingest
from cli.serve_cmd import serve
from cli.worker_cmds import status_cmd, submit_cmd, worker


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="kvstore")
def main() -> None:
    """kvstore: prefill documents once, store their compressed KV caches, answer many questions.

    \b
    Quick start:
        kvstore ingest docs/
        kvstore ls
        kvstore ask docs/report.md "What was the revenue in 2023?"

    Settings come from flags or env vars: KVSTORE_HOME (store folder, default ~/.kvstore),
    KVSTORE_REDIS_URL (shared index; default embedded Redis), KVSTORE_BLOBS (s3://bucket/prefix
    or a folder; default KVSTORE_HOME/blobs), KVSTORE_MODEL, KVSTORE_PRESS,
    KVSTORE_RATIO, KVSTORE_QUANT, KVSTORE_FORMAT, KVSTORE_DEVICE, KVSTORE_MAX_DOCUMENT_MB.
    Shell completion (context ids too): eval "$(_KVSTORE_COMPLETE=bash_source kvstore)".
    """


for command in (
    ingest,
    list_contexts,
    show,
    ask,
    search,
    remove,
    gc,
    reindex,
    stats,
    evaluate_command,
    report_command,
    bench,
    serve,
    worker,
    submit_cmd,
    status_cmd,
):
    main.add_command(command)
