"""Options shared by several commands, and the client they configure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kvstore.client import KVStore
from kvstore.kv.quant import QUANT_BITS
from kvstore.presses import PRESSES
from kvstore.storage.blob import FORMATS

F = Callable[..., Any]


def store_options(func: F) -> F:
    """--home and --redis-url: where the store lives (env: KVSTORE_HOME, KVSTORE_REDIS_URL)."""
    func = click.option(
        "--redis-url",
        envvar="KVSTORE_REDIS_URL",
        default=None,
        help="Shared index: redis:// or rediss:// URL (default: embedded Redis in --home).",
    )(func)
    return click.option(
        "--home",
        envvar="KVSTORE_HOME",
        default=None,
        type=click.Path(file_okay=False),
        help="Store folder (default ~/.kvstore).",
    )(func)


def compression_options(func: F) -> F:
    """--model, --press, --ratio, --quant, --format: how contexts are compressed and stored."""
    options = [
        click.option("--model", "-m", default=None, help="Model: smollm2-135m (default), a local dir or an HF id."),
        click.option(
            "--press",
            "-p",
            default=None,
            metavar="SPEC",
            help="Press or chain, e.g. kvzip, kvzip:0.75, kvzip:0.75+streaming:0.5, kvzip@global:0.9 "
            "(name@budget: global, floored, uniform; default kvzip). "
            f"Presses: {', '.join(sorted(PRESSES))}.",
        ),
        click.option(
            "--ratio",
            "-r",
            default=None,
            type=click.FloatRange(0.0, 1.0, max_open=True),
            help="Fraction of KV pairs removed, in [0, 1) (default 0.75).",
        ),
        click.option(
            "--quant",
            "-q",
            default=None,
            type=click.Choice(sorted(QUANT_BITS)),
            help="Stored K/V precision (default none).",
        ),
        click.option(
            "--format",
            "blob_format",
            default=None,
            type=click.Choice(sorted(FORMATS)),
            help="Blob format (default safetensors).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def open_client(home: str | None = None, **overrides: object) -> KVStore:
    """A client from the environment, with the command's flags on top (None = not given)."""
    return KVStore(home=Path(home).expanduser() if home else None, **overrides)


def haystack_option(func: F) -> F:
    """--haystack: where eval and bench take filler text from."""
    return click.option(
        "--haystack",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="Folder of .txt files for the filler text (default: generated text).",
    )(func)
