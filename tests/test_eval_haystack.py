"""Haystack sources and needle placement: deterministic filler, folder option, depths at sentence boundaries."""

from __future__ import annotations

import re

import pytest

from kvstore.eval.haystack import (
    FolderHaystack,
    GeneratedHaystack,
    Needle,
    approx_tokens,
    build_context,
    filler,
    get_haystack,
    insert_needles,
    split_sentences,
)

NEEDLE = "The special magic number for calm-lantern is 4817263."


def test_generated_filler_is_deterministic_varied_and_clean() -> None:
    text = filler(2000, seed=1)
    assert text == filler(2000, seed=1) and text != filler(2000, seed=2)
    assert abs(approx_tokens(text) - 2000) <= 20
    sentences = split_sentences(text)
    assert len(set(sentences)) > 0.9 * len(sentences)
    assert not re.search(r"\d|special|magic|VAR", text)


def test_folder_haystack(tmp_path) -> None:
    banner = "Want to start a startup?  Get funded by\nY Combinator.\n\n"
    essay = "May 2020The first idea was odd.Then a second idea came along. Short. It ends here.[2] "
    (tmp_path / "one.txt").write_text(banner + essay)
    (tmp_path / "notes.md").write_text("Ignored because it is not a txt file.")
    source = get_haystack(tmp_path)
    assert isinstance(source, FolderHaystack) and len(source) == 3
    stream = source.sentences(seed=0)
    drawn = [next(stream) for _ in range(6)]
    assert set(drawn) == {"May 2020The first idea was odd.", "Then a second idea came along.", "It ends here."}
    assert "Combinator" not in " ".join(drawn) and "[2]" not in " ".join(drawn)
    text = build_context(100, [Needle(NEEDLE, 0.5)], source, seed=3)
    assert NEEDLE in text and abs(approx_tokens(text) - 100) <= 8


def test_get_haystack_choices(tmp_path) -> None:
    assert isinstance(get_haystack(None), GeneratedHaystack)
    assert isinstance(get_haystack("generated"), GeneratedHaystack)
    with pytest.raises(ValueError, match="folder"):
        get_haystack(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .txt"):
        get_haystack(tmp_path)


def test_insert_needles_at_depths() -> None:
    sentences = [f"S{i}." for i in range(10)]
    out = insert_needles(sentences, [Needle("END", 1.0), Needle("MID", 0.5), Needle("START", 0.0)], [1] * 10)
    assert out[0] == "START" and out[-1] == "END" and out.index("MID") == 6  # after S0..S4, START
    assert [s for s in out if s.endswith(".")] == sentences
    weighted = insert_needles(["a.", "b.", "c."], [Needle("N", 0.5)], [8, 1, 1])
    assert weighted == ["a.", "N", "b.", "c."]
    with pytest.raises(ValueError):
        Needle("x", 1.5)


@pytest.mark.parametrize("depth", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_needle_sits_at_a_sentence_boundary_at_its_depth(depth: float) -> None:
    text = build_context(1000, [Needle(NEEDLE, depth)], seed=4)
    at = text.index(NEEDLE)
    assert at == 0 or text[at - 2 : at] == ". "
    assert at + len(NEEDLE) == len(text) or text[at + len(NEEDLE)] == " "
    assert abs(approx_tokens(text[:at]) / approx_tokens(text) - depth) < 0.03
    assert abs(approx_tokens(text) - 1000) <= 15
