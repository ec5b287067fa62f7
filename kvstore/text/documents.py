"""Files -> clean text: discovery, format readers and validation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from bs4 import BeautifulSoup


class DocumentError(ValueError):
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


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """Expand folders recursively into supported files, sorted; missing paths raise DocumentError."""
    found: list[Path] = []
    for given in paths:
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


def read_document(path: Path) -> str:
    """Text of a supported file; empty, binary or undecodable files raise DocumentError."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DocumentError(
            f"{path}: unsupported file type {path.suffix or '(none)'} (supported: {', '.join(sorted(READERS))})"
        )
    raw = path.read_bytes()
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
