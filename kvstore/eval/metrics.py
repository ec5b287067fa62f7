"""Scores of a model's free-text answer against a sample's expected strings, looked up by metric name.

Substring metrics (RULER's string_match_all / string_match_part) suit retrieval, whose answers are rare
strings (7-digit numbers, names); aggregation answers are common words, so they are matched as whole words.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Metric = Callable[[str, Sequence[str]], float]

_DIGIT_GROUP_RE = re.compile(r"(?<=\d)[,\u202f\u00a0](?=\d{3}\b)")
_WORD_RE = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Lowercase, digit-group separators dropped ("1,234,567" -> "1234567"), whitespace collapsed."""
    return " ".join(_DIGIT_GROUP_RE.sub("", text.lower()).split())


def _check(expected: Sequence[str]) -> None:
    if isinstance(expected, str) or not expected:
        raise ValueError("expected must be a non-empty list of strings")


def contains_all(answer: str, expected: Sequence[str]) -> float:
    """Fraction of expected strings found in the answer (case-insensitive substring)."""
    _check(expected)
    text = normalize(answer)
    return sum(normalize(e) in text for e in expected) / len(expected)


def contains_any(answer: str, expected: Sequence[str]) -> float:
    """1.0 when any expected string is found in the answer (case-insensitive substring), else 0.0."""
    _check(expected)
    text = normalize(answer)
    return float(any(normalize(e) in text for e in expected))


def word_recall(answer: str, expected: Sequence[str]) -> float:
    """Fraction of expected words present as whole words in the answer (case-insensitive)."""
    _check(expected)
    words = set(_WORD_RE.findall(normalize(answer)))
    return sum(set(_WORD_RE.findall(normalize(e))) <= words for e in expected) / len(expected)


METRICS: dict[str, Metric] = {
    "contains_all": contains_all,
    "contains_any": contains_any,
    "word_recall": word_recall,
}


def get_metric(name: str) -> Metric:
    """The metric function registered under `name`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; accepted: {', '.join(METRICS)}")
    return METRICS[name]


def score(metric: str, answer: str, expected: Sequence[str]) -> float:
    """Score `answer` against `expected` with the named metric, in [0, 1]."""
    return get_metric(metric)(answer, expected)
