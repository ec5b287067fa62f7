"""Documents in: discovery, readers, validation, splitting, and ingest's dedupe before any prefill."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvstore.ingest as ingest_module
from kvstore.documents import DocumentError, discover, read_document, split_paragraphs
from kvstore.ingest import ingest_text
from kvstore.presses import make_press
from kvstore.store import ContextStore
from tests.tiny import sample_text, tiny_model


def test_discover_recurses_skips_hidden_and_unsupported(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("b")
    (tmp_path / "sub" / "c.html").write_text("<p>c</p>")
    (tmp_path / "sub" / "d.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "e.txt").write_text("e")
    assert [p.name for p in discover([tmp_path])] == ["a.txt", "b.md", "c.html"]
    with pytest.raises(DocumentError, match="no such file"):
        discover([tmp_path / "missing"])


def test_html_becomes_text_without_scripts_or_styles(tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    page.write_text("<html><style>p{}</style><body><h1>Title</h1><p>Body text.</p><script>x()</script></body></html>")
    assert read_document(page) == "Title\n\nBody text."


def test_unsupported_type_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "sheet.xlsx"
    doc.write_bytes(b"PK\x03\x04")
    with pytest.raises(DocumentError, match="unsupported file type .xlsx"):
        read_document(doc)


def test_a_sentence_longer_than_a_part_is_cut_to_fit() -> None:
    words = [f"w{i}" for i in range(50)]
    parts = split_paragraphs(" ".join(words) + "\n\nShort one.", lambda t: len(t.split()), max_tokens=10)
    assert all(len(p.split()) <= 10 for p in parts)
    assert " ".join(parts).split() == [*words, "Short", "one."]  # nothing lost, order kept
    assert split_paragraphs("x" * 40, len, max_tokens=40) == ["x" * 40]  # fits: untouched
    assert all(len(p) <= 16 for p in split_paragraphs("y" * 40, len, max_tokens=16))  # no space at all


def test_split_paragraphs_respects_the_limit_and_keeps_order() -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 30 for i in range(10)]
    parts = split_paragraphs("\n\n".join(paragraphs), lambda t: len(t.split()), max_tokens=70)
    assert all(len(part.split()) <= 70 for part in parts)
    assert "\n\n".join(parts).split() == "\n\n".join(paragraphs).split()
    assert len(parts) == 5


def test_long_document_is_stored_as_linked_parts_and_not_recomputed(
    store_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = tiny_model("llama")
    text = "\n\n".join(sample_text(60, seed=i) for i in range(6))
    press = make_press("kvzip", 0.5)
    with ContextStore.open() as store:
        parts = ingest_text(loaded, store, text, press, source="long.txt", max_tokens=150)
        assert len(parts) > 1 and all(p.created for p in parts)
        records = [p.record for p in parts]
        assert [r.part for r in records] == list(range(len(records)))
        assert {r.parts for r in records} == {len(records)} and len({r.document_id for r in records}) == 1

        def fail(*args: object, **kwargs: object) -> None:
            raise AssertionError("a stored document must not be compressed again")

        monkeypatch.setattr(ingest_module, "compress", fail)
        again = ingest_text(loaded, store, text, press, source="long.txt", max_tokens=150)
        assert [p.record.id for p in again] == [r.id for r in records] and not any(p.created for p in again)
        assert len(store.list()) == len(records)


def test_stages_are_reported_per_part_and_not_for_stored_parts(store_home: Path) -> None:
    loaded = tiny_model("llama")
    text = "\n\n".join(sample_text(60, seed=i) for i in range(4))
    heard: list[tuple[str, int]] = []
    with ContextStore.open() as store:
        parts = ingest_text(
            loaded,
            store,
            text,
            make_press("kvzip", 0.5),
            max_tokens=150,
            report=lambda stage, tokens, part: heard.append((stage, part)),
        )
        assert heard == [(stage, n) for n in range(len(parts)) for stage in ("prefilling", "scoring", "writing")]
        heard.clear()
        ingest_text(
            loaded,
            store,
            text,
            make_press("kvzip", 0.5),
            max_tokens=150,
            report=lambda stage, tokens, part: heard.append((stage, part)),
        )
        assert heard == []  # everything was already stored: no stage runs
