"""Answer scoring on hand-made cases."""

from __future__ import annotations

import pytest

from kvstore.eval.metrics import METRICS, contains_all, contains_any, get_metric, normalize, score, word_recall


def test_contains_all() -> None:
    assert contains_all("The special magic number is 4817263.", ["4817263"]) == 1.0
    assert contains_all("They are 1111111 and 2222222.", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert contains_all("I do not know.", ["4817263"]) == 0.0
    assert contains_all("she lives in BRAMBLEWICK", ["Bramblewick"]) == 1.0
    assert contains_all("It is 4,817,263.", ["4817263"]) == 1.0


def test_contains_any() -> None:
    assert contains_any("Greywell, I think", ["Greywell", "Grey Well"]) == 1.0
    assert contains_any("greywell", ["GREYWELL"]) == 1.0
    assert contains_any("Somewhere else", ["Greywell", "Grey Well"]) == 0.0
    assert contains_any("Grey Well and more", ["Greywell", "Grey Well"]) == 1.0


def test_word_recall_matches_whole_words() -> None:
    expected = ["art", "Kettle", "moss", "fig"]
    assert word_recall("kettle, ART, moss and fig", expected) == 1.0
    assert word_recall("The party had a kettle and some mossy figs.", expected) == 0.25
    assert word_recall("nothing relevant", expected) == 0.0
    assert word_recall("VAR ABCDE and var fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)


def test_registry_and_errors() -> None:
    assert set(METRICS) == {"contains_all", "contains_any", "word_recall"}
    assert get_metric("word_recall") is word_recall
    assert score("contains_all", "x 12 y", ["12", "13"]) == 0.5
    with pytest.raises(ValueError, match="accepted"):
        get_metric("bleu")
    for bad in ([], "4817263"):
        with pytest.raises(ValueError):
            contains_all("4817263", bad)


def test_normalize() -> None:
    assert normalize("  The Number\n is 1,234,567 ") == "the number is 1234567"
    assert normalize("a, b, 12, 345") == "a, b, 12, 345"
