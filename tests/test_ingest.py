"""Documents in: discovery, readers, validation, splitting, and ingest's dedupe before any prefill."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvstore.ingest as ingest_module
from kvstore.ingest import ingest_text
from kvstore.presses import make_press
from kvstore.storage.store import ContextStore
from kvstore.text.documents import DocumentError, discover, read_document
from kvstore.text.parts import split_tokens
from kvstore.text.prompt import encode
from tests.tiny import sample_text, tiny_model, tiny_tokenizer


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


def test_a_document_that_fits_is_one_part_with_the_ids_of_the_whole_text() -> None:
    tokenizer = tiny_tokenizer()
    text = sample_text(80, seed=1)
    [part] = split_tokens(text, tokenizer, max_tokens=10_000)
    assert part.text == text and part.ids == encode(tokenizer, text)


def test_parts_end_at_paragraph_breaks_and_fit() -> None:
    tokenizer = tiny_tokenizer()
    paragraphs = [sample_text(30, seed=i) for i in range(8)]
    lengths = [len(encode(tokenizer, p)) for p in paragraphs]
    limit = max(a + b for a, b in zip(lengths, lengths[1:], strict=False)) + 4  # two paragraphs always fit
    parts = split_tokens("\n\n".join(paragraphs), tokenizer, max_tokens=limit)
    assert 1 < len(parts) < len(paragraphs)
    assert all(len(part.ids) <= limit for part in parts)
    assert all(set(part.text.split("\n\n")) <= set(paragraphs) for part in parts)  # whole paragraphs only
    assert "\n\n".join(part.text for part in parts) == "\n\n".join(paragraphs)  # nothing lost, order kept


def test_a_sentence_longer_than_a_part_is_cut_at_spaces_then_anywhere() -> None:
    tokenizer = tiny_tokenizer()
    words = sample_text(60, seed=3).rstrip(".").split()
    parts = split_tokens(" ".join(words) + "\n\nShort one.", tokenizer, max_tokens=12)
    assert all(len(part.ids) <= 12 for part in parts)
    assert " ".join(part.text for part in parts).split() == [*words, "Short", "one."]
    assert all(not part.text[0].isspace() and not part.text[-1].isspace() for part in parts)
    no_space = split_tokens("y" * 40, tokenizer, max_tokens=5)
    assert all(len(part.ids) <= 5 for part in no_space) and "".join(p.text for p in no_space) == "y" * 40


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


def test_stages_are_reported_per_part_with_tokens_done_and_not_for_stored_parts(store_home: Path) -> None:
    loaded = tiny_model("llama")
    text = "\n\n".join(sample_text(60, seed=i) for i in range(4))
    heard: list[dict[str, object]] = []

    def report(stage: str, **meta: object) -> None:
        heard.append({"stage": stage, **meta})

    with ContextStore.open() as store:
        parts = ingest_text(loaded, store, text, make_press("kvzip", 0.5), max_tokens=150, report=report)
        for n, part in enumerate(parts):
            mine = [h for h in heard if h["part"] == n]
            assert [h["stage"] for h in mine if h["done"] == 0] == ["prefilling", "scoring", "writing"]
            assert {h["parts"] for h in mine} == {len(parts)}
            prefilled = [h["done"] for h in mine if h["stage"] == "prefilling"]
            assert prefilled == sorted(prefilled) and prefilled[-1] == part.record.original_length
            scored = [h["done"] for h in mine if h["stage"] == "scoring"]
            assert scored[-1] == part.record.original_length - part.record.prefix_length  # every document token
        heard.clear()
        ingest_text(loaded, store, text, make_press("kvzip", 0.5), max_tokens=150, report=report)
        assert heard == []  # everything was already stored: no stage runs
