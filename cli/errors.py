"""Known failures become one clear line and a documented exit code, never a traceback."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from kvstore.errors import KVStoreError, NotFoundError, UnavailableError, redact

EXIT_OK = 0
EXIT_ERROR = 1  # bad input, nothing found, unusable data: nothing was stored or changed
EXIT_USAGE = 2  # click's own: an unknown option, a missing argument, a value of the wrong type
EXIT_UNAVAILABLE = 3  # Redis, the broker or the object store cannot be reached, or refused access
EXIT_TIMEOUT = 4  # `status --wait --timeout` ran out before the job finished
EXIT_PARTIAL = 5  # the work finished, but some documents failed (the others were stored)

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  bad input, nothing found, or unusable data (nothing was stored or changed)
  2  usage error (unknown option, missing argument)
  3  a service is unreachable (Redis, broker, object store)
  4  status --wait --timeout ran out before the job finished
  5  finished, but some documents failed (the others were stored)"""


class CommandError(click.ClickException):
    """A one-line `Error: ...` with a chosen exit code; passwords in quoted URLs are masked."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(redact(message))
        self.exit_code = exit_code


def exit_code_for(exc: BaseException) -> int:
    return EXIT_UNAVAILABLE if isinstance(exc, UnavailableError) else EXIT_ERROR


def fail(message: str, exit_code: int = EXIT_ERROR) -> NoReturn:
    raise CommandError(message, exit_code)


class FriendlyGroup(click.Group):
    """A click group whose commands report known failures as `Error: ...` with their exit code.

    Library errors (`kvstore.errors`), ValueError (bad values found deep in a call) and OSError
    (a folder that cannot be created, a permission) all become one line.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KVStoreError, ValueError, NotFoundError) as exc:
            raise CommandError(str(exc), exit_code_for(exc)) from exc
        except OSError as exc:
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            raise CommandError(f"{exc.strerror or exc}{where}", EXIT_ERROR) from exc
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
