"""The failures kvstore reports to users, by kind: the CLI and the HTTP server map each kind to one
exit code / status. Every library error derives from one of these; importing this loads nothing."""

from __future__ import annotations

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
