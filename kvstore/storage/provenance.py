"""What every description of a stored context shares, declared once: where it came from, which document.

`ContextMeta` (what a writer knows), `BlobHeader` (what a blob carries) and `ContextRecord` (what
the index holds) are views over these two groups plus their own fields; the record is derived
from a blob's header and its record info (`kvstore.storage.store.record_for`), never copied by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Origin:
    """What produced a context: the model (name and weights), its tokenizer and the press with its parameters."""

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    press: dict[str, Any]


@dataclass
class DocumentRef:
    """Which document a context is, or which part of it."""

    source: str = ""
    document_sha256: str = ""
    document_id: str = ""  # links the parts of a long document split into several contexts
    part: int = 0
    parts: int = 1

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> DocumentRef:
        """The document fields of a blob's record info (typed: the info is JSON from the blob)."""
        return cls(
            source=str(info.get("source", "")),
            document_sha256=str(info.get("document_sha256", "")),
            document_id=str(info.get("document_id", "")),
            part=int(info.get("part", 0)),
            parts=int(info.get("parts", 1)),
        )


def values_of(group: type, obj: object) -> dict[str, Any]:
    """The fields of `group` (Origin, DocumentRef) as `obj` holds them: to pass one view's group to another."""
    return {f.name: getattr(obj, f.name) for f in fields(group)}
