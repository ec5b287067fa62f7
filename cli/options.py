"""Options shared by several commands: each group fills one `Settings`, built once per command.

Flags are collected into the click context instead of being passed to every command function, so
a command declares the groups it needs (`@store_options`, `@compression_options`) and receives a
validated `settings: Settings`. Importing this module loads no torch: commands that only read the
index start in well under a second.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kvstore.config import BLOB_FORMATS, DECODE_KERNELS, QUANT_BITS, Compression, Settings

F = Callable[..., Any]
_META_KEY = "kvstore.settings"


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta.setdefault(_META_KEY, {})[name] = value
        return value

    return callback


def _setting(*decls: str, name: str, **kwargs: Any) -> F:
    """A flag whose value becomes the Settings field `name` (its env var is read by Settings itself)."""
    return click.option(*decls, default=None, expose_value=False, callback=_remember(name), **kwargs)


def with_settings(func: F) -> F:
    """Hand the command a `settings` built from the environment and every settings flag given."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = click.get_current_context().meta.get(_META_KEY, {})
        return func(*args, settings=Settings().with_overrides(**given), **kwargs)

    return wrapper


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and infinity (click's own lets nan through every bound)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def given_compression() -> Compression:
    """The compression flags given on this command line (only those: a worker's own settings fill the rest)."""
    given = click.get_current_context().meta.get(_META_KEY, {})
    return Compression(**{k: v for k, v in given.items() if k in Compression.__dataclass_fields__})


def _apply(func: F, options: list[F]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def _home(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    return _remember("home")(ctx, param, Path(value).expanduser() if value else None)


def store_options(func: F) -> F:
    """--home, --redis-url, --blobs: where the store lives (env: KVSTORE_HOME, KVSTORE_REDIS_URL, KVSTORE_BLOBS)."""
    return _apply(
        func,
        [
            click.option(
                "--home",
                default=None,
                expose_value=False,
                callback=_home,
                type=click.Path(file_okay=False),
                help="Store folder (default: KVSTORE_HOME, else ~/.kvstore).",
            ),
            _setting(
                "--redis-url",
                name="redis_url",
                metavar="URL",
                help="Shared index: redis:// or rediss:// URL (default: KVSTORE_REDIS_URL, else the embedded Redis).",
            ),
            _setting(
                "--blobs",
                name="blobs",
                metavar="URL",
                help="Where blobs live: s3://bucket/prefix (credentials from the standard AWS environment and "
                "config files) or a folder (default: KVSTORE_BLOBS, else HOME/blobs).",
            ),
        ],
    )


def model_option(func: F) -> F:
    """--model: which model loads (env: KVSTORE_MODEL)."""
    return _setting(
        "--model", "-m", name="model", help="Model: smollm2-135m (default), a local model dir or a cached HF id."
    )(func)


def kernel_option(func: F) -> F:
    """--kernel: which decode kernel attends to stored contexts (env: KVSTORE_KERNEL)."""
    return _setting(
        "--kernel",
        name="kernel",
        type=click.Choice(DECODE_KERNELS),
        help="Decode kernel: auto (default: per call, the one measured faster there), loop (the reference), fused.",
    )(func)


def compression_options(func: F) -> F:
    """--model, --press, --ratio, --quant, --format: how contexts are compressed and stored."""
    return _apply(
        func,
        [
            model_option,
            _setting(
                "--press",
                "-p",
                name="press",
                metavar="SPEC",
                help="Press or chain, e.g. kvzip, kvzip:0.75, kvzip:0.75+streaming:0.5, kvzip@global:0.9, "
                "kvzip+think:0.25 (default kvzip). Presses: kvzip, streaming, h2o, snapkv, tova, pyramidkv, "
                "kvcompose, kvzip_head, think, none.",
            ),
            _setting(
                "--ratio",
                "-r",
                name="ratio",
                type=float,
                help="Fraction of the document's KV pairs removed, in [0, 1) (default 0.75).",
            ),
            _setting(
                "--quant", "-q", name="quant", type=click.Choice(sorted(QUANT_BITS)), help="Stored K/V precision."
            ),
            _setting("--format", name="blob_format", type=click.Choice(BLOB_FORMATS), help="Blob format."),
        ],
    )


def json_option(func: F) -> F:
    """--json: machine-readable output on stdout instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")(func)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def complete_context_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of stored context ids (reads only the index: fast, no model)."""
    from kvstore.storage.index import ContextIndex

    try:
        given = ctx.meta.get(_META_KEY, {})
        settings = Settings().with_overrides(**given)
        index = ContextIndex.open(settings.redis_url, settings.home)
        try:
            return [cid for cid in index.ids() if cid.startswith(incomplete)][:200]
        finally:
            index.close()
    except Exception:  # completion must never print a traceback into the user's shell
        return []


def ref_argument(name: str = "ref", **kwargs: Any) -> F:
    """A context reference: an id, a unique id prefix, or the path of an ingested document."""
    return click.argument(name, shell_complete=complete_context_ids, **kwargs)


def haystack_option(func: F) -> F:
    """--haystack: where eval and bench take filler text from."""
    return click.option(
        "--haystack",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="Folder of .txt files for the filler text (default: generated text).",
    )(func)


def check_model(settings: Settings) -> None:
    """Fail in about a second, before torch is imported, when the model to load cannot be found."""
    from kvstore.engine.locate import locate

    locate(settings.model)


def quiet_transformers() -> None:
    """The CLI prints its own progress: silence transformers' warnings and bars (imports it, so call late)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
