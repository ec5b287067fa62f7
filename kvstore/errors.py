"""The failures kvstore reports to users, by kind: the CLI and the HTTP server map each kind to one
exit code / status. Every library error derives from one of these; importing this loads nothing."""

from __future__ import annotations

import re
from importlib import import_module


class KVStoreError(Exception):
    """A request kvstore cannot carry out; the message says why in words a user can act on."""


class InputError(KVStoreError, ValueError):
    """Bad input: a document, a setting, a model name, a question. Nothing was stored or changed."""


class NotFoundError(KVStoreError, LookupError):
    """No stored context (or job) matches what was asked for."""


class UnavailableError(KVStoreError):
    """A service kvstore needs (Redis, the broker, the object store) cannot be reached or refused access."""


class DataError(KVStoreError):
    """Stored data cannot be used: damaged, written by another model or format version, or tampered with."""


def import_extra(module: str, extra: str):  # noqa: ANN201 (returns the module)
    """Import an optional dependency, or say which extra installs it (instead of a ModuleNotFoundError)."""

    try:
        return import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0]:
            raise
        raise InputError(
            f"this needs {module.split('.')[0]}, part of the {extra!r} extra: pip install 'kvstore[{extra}]'"
        ) from exc


_URL_PASSWORD = re.compile(r"(\w+://[^/\s:@]*:)[^@\s/]+@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|pass|pwd)=)[^&\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` (a URL, or a message quoting one) with every password in it masked."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))
