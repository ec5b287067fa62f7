"""Files -> clean text: discovery, format readers, validation, and paragraph-boundary splitting."""

from __future__ import annotations

import re
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


def split_paragraphs(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """Split at blank lines into parts of at most `max_tokens`; an oversized paragraph splits at sentences,
    and a sentence still too long (a table, a list, code) into halves at spaces until each fits."""
    units: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.strip():
            if count_tokens(paragraph) <= max_tokens:
                units.append(paragraph)
            else:
                units += [piece for s in _sentences(paragraph) for piece in _fitting(s, count_tokens, max_tokens)]
    parts: list[str] = []
    current: list[str] = []
    for unit in units:
        candidate = "\n\n".join([*current, unit])
        if current and count_tokens(candidate) > max_tokens:
            parts.append("\n\n".join(current))
            current = [unit]
        else:
            current.append(unit)
    if current:
        parts.append("\n\n".join(current))
    return parts


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]


def _fitting(unit: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """`unit` if it fits, else its halves (at the middle space, or mid-string without one), recursively."""
    if count_tokens(unit) <= max_tokens or len(unit) < 2:
        return [unit]
    words = unit.split(" ")
    if len(words) > 1:
        halves = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])]
    else:
        halves = [unit[: len(unit) // 2], unit[len(unit) // 2 :]]
    return [piece for half in halves if half for piece in _fitting(half, count_tokens, max_tokens)]
