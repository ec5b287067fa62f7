"""Files -> clean text: discovery, format readers and validation."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from bs4 import BeautifulSoup

from kvstore.errors import InputError


class DocumentError(InputError):
    """A file cannot be ingested; the message says why in words a user can act on."""


def _html_to_text(raw: str) -> str:
    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    blocks = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n\n".join(block for block in blocks if block)


READERS: dict[str, Callable[[str], str]] = {
    ".txt": str,
    ".md": str,
    ".markdown": str,
    ".rst": str,
    ".html": _html_to_text,
    ".htm": _html_to_text,
}


# Largest document read by default (a setting: KVSTORE_MAX_DOCUMENT_MB); far beyond any model window.
DEFAULT_MAX_DOCUMENT_BYTES = 50 * 2**20


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders recursively into supported files, sorted; missing paths raise DocumentError.

    An empty path is refused (it would otherwise mean the working directory).
    """
    found: list[Path] = []
    for given in paths:
        if not str(given).strip():
            raise DocumentError("empty path: name a file or a folder (use . for the current folder)")
        path = Path(given).expanduser()
        if not path.exists():
            raise DocumentError(f"{given}: no such file or directory")
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in READERS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`: FIFOs, devices and sockets are refused (they
    block or never end), even behind a symlink, and the size is checked before and while reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DocumentError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DocumentError(f"{path}: not a regular file (a pipe, a device or a socket cannot be ingested)")
        if info.st_size > max_bytes:
            raise DocumentError(f"{path}: {info.st_size:,} bytes is over the {max_bytes:,}-byte document limit")
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise DocumentError(f"{path}: over the {max_bytes:,}-byte document limit")
    return raw


def read_document(path: Path, max_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> str:
    """Text of a supported file; empty, binary, undecodable, oversized or non-regular files raise DocumentError."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DocumentError(
            f"{path}: unsupported file type {path.suffix or '(none)'} (supported: {', '.join(sorted(READERS))})"
        )
    raw = _read_regular_file(path, max_bytes)
    if b"\x00" in raw[:8192]:
        raise DocumentError(f"{path}: looks like a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{path}: not valid UTF-8 text (byte {exc.start})") from exc
    text = reader(text).strip()
    if not text:
        raise DocumentError(f"{path}: the document is empty")
    return text
