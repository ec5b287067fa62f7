"""Known failures become one clear line and exit code 1, never a traceback."""

from __future__ import annotations

import click

from kvstore.engine.models import ModelNotFoundError
from kvstore.storage.blob import BlobError
from kvstore.storage.index import RedisIndexError
from kvstore.storage.store import ContextNotFoundError
from kvstore.text.documents import DocumentError

USER_ERRORS: tuple[type[Exception], ...] = (
    BlobError,
    ContextNotFoundError,
    DocumentError,
    ModelNotFoundError,
    RedisIndexError,
    ValueError,
)


class FriendlyGroup(click.Group):
    """A click group whose commands report USER_ERRORS as `Error: ...` instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc
