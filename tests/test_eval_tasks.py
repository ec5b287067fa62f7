"""The synthetic task generator: deterministic, answers really in the context, lengths as requested."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from kvstore.eval.haystack import approx_tokens
from kvstore.eval.tasks import (
    AGGREGATION,
    MULTI_DOCUMENT,
    RETRIEVAL,
    TASKS,
    Sample,
    make_niah,
    make_sample,
    make_suite,
    task_names,
)

ALL = list(TASKS)


def _words(text: str) -> Counter[str]:
    return Counter(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture(scope="module")
def suite() -> list[Sample]:
    return make_suite(None, 3, 800, seed=11)


@pytest.fixture
def essays(tmp_path):
    """A small folder haystack, so the folder path is tested without the shared essays."""
    body = " ".join(f"Essay {i} argues that startups grow by talking to users, week after week." for i in range(40))
    (tmp_path / "a.txt").write_text("Want to start a startup? Get funded by Y Combinator.\n\n" + body)
    (tmp_path / "b.txt").write_text(body.replace("startups", "cities") + " Footnotes matter.[1]")
    return tmp_path


def test_registry_has_every_task_family() -> None:
    assert set(task_names(RETRIEVAL)) == {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "qa"}
    assert set(task_names(AGGREGATION)) == {"variable_tracking", "common_words", "frequent_words"}
    assert set(task_names(MULTI_DOCUMENT)) == {"multidoc_needle", "two_hop", "long_document"}
    with pytest.raises(ValueError, match="accepted"):
        make_suite(["nope"], 1, 500)


def test_same_seed_same_samples(suite: list[Sample]) -> None:
    assert make_suite(None, 3, 800, seed=11) == suite


def test_different_seed_different_samples(suite: list[Sample]) -> None:
    other = make_suite(None, 3, 800, seed=12)
    for a, b in zip(suite, other, strict=True):
        assert a.task == b.task
        assert a.context != b.context
        assert (a.question, a.answers) != (b.question, b.answers)


def test_sample_does_not_depend_on_the_rest_of_the_suite(suite: list[Sample]) -> None:
    alone = make_suite(["variable_tracking"], 3, 800, seed=11)
    assert alone == [s for s in suite if s.task == "variable_tracking"]


def test_samples_are_well_formed_and_serialisable(suite: list[Sample]) -> None:
    assert len(suite) == 3 * len(ALL)
    assert len({s.id for s in suite}) == len(suite)
    for s in suite:
        assert s.family == TASKS[s.task].family and s.metric == TASKS[s.task].metric
        assert s.answers and all(isinstance(a, str) and a for a in s.answers)
        assert s.question.strip() and s.question not in s.context
        assert s.score(" ".join(s.answers)) == 1.0
        json.dumps(s.to_dict())


@pytest.mark.parametrize("tokens", [500, 1500])
@pytest.mark.parametrize("haystack", ["generated", "folder"])
def test_every_answer_is_in_its_context(tokens: int, haystack: str, essays) -> None:
    source = essays if haystack == "folder" else None
    for s in make_suite(None, 2, tokens, seed=5, haystack=source):
        for answer in s.answers:
            assert answer in s.context, (s.id, answer)


@pytest.mark.parametrize("tokens", [500, 1000, 2000])
def test_context_length_near_request(tokens: int) -> None:
    for s in make_suite(None, 2, tokens, seed=2):
        assert abs(approx_tokens(s.context) - tokens) <= 0.03 * tokens, s.id
        assert s.meta["tokens"] == approx_tokens(s.context)


def test_length_follows_the_given_token_counter() -> None:
    def count(text: str) -> int:  # a "tokenizer" with 4 characters per token
        return len(text) // 4

    for s in make_suite(None, 1, 1000, seed=4, count_tokens=count):
        assert abs(count(s.context) - 1000) <= 30, s.id
        assert s.meta["tokens"] == count(s.context)


def test_niah_depths_spread_evenly_and_needle_unique() -> None:
    cases = make_niah(5, 1500, seed=3)
    assert [c.meta["depth"] for c in cases] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    for c in cases:
        (value,) = c.answers
        assert c.context.count(value) == 1
        assert re.search(rf"The special magic number for {c.meta['key']} is {value}\.", c.context)
        assert c.question == f"What is the special magic number for {c.meta['key']}?"
        assert abs(c.context.index(value) / len(c.context) - c.meta["depth"]) < 0.05
    assert make_niah(5, 1500, seed=3) == cases
    first, last = make_niah(2, 1500, seed=3, depths=[0.0, 1.0])
    assert first.context.startswith("The special magic number for")
    assert last.context.endswith(f"is {last.answers[0]}.")
    assert make_niah(5, 1500, seed=3)[0] == make_suite(["niah_single"], 5, 1500, seed=3)[0]


def test_multi_needle_tasks_plant_every_needle() -> None:
    mv = make_sample("niah_multivalue", 0, 1, 1000, seed=8)
    assert len(mv.answers) == 4
    assert all(f"for {mv.meta['key']} is {v}." in mv.context for v in mv.answers)
    mq = make_sample("niah_multiquery", 0, 1, 1000, seed=8)
    assert all(k in mq.question for k in mq.meta["keys"])
    mk = make_sample("niah_multikey", 0, 1, 1000, seed=8)
    assert mk.context.count("The special magic number for") == 4 and len(mk.answers) == 1


def test_variable_tracking_answers_are_exactly_the_chain() -> None:
    for i in range(4):
        s = make_sample("variable_tracking", i, 4, 1200, seed=9)
        value = s.meta["value"]
        holds: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context):
            holds[name] = holds[rhs[4:]] if rhs.startswith("VAR ") else rhs  # KeyError if used before assigned
        assert sorted(n for n, v in holds.items() if v == value) == sorted(s.answers)
        assert str(value) in s.question


@pytest.mark.parametrize("tokens", [500, 2000])
def test_common_words_are_the_most_common(tokens: int) -> None:
    for i in range(3):
        s = make_sample("common_words", i, 3, tokens, seed=1)
        ranked = _words(s.context).most_common()
        k = len(s.answers)
        assert k == 10 and {w for w, _ in ranked[:k]} == set(s.answers)
        assert ranked[k - 1][1] > ranked[k][1]


@pytest.mark.parametrize("tokens", [500, 2000])
def test_frequent_words_are_the_most_frequent(tokens: int) -> None:
    for i in range(3):
        s = make_sample("frequent_words", i, 3, tokens, seed=1)
        ranked = _words(s.context).most_common()
        assert [w for w, _ in ranked[:3]] == s.answers
        assert ranked[2][1] > ranked[3][1]


def test_qa_asks_about_a_planted_fact() -> None:
    for i in range(6):
        s = make_sample("qa", i, 6, 1000, seed=6)
        assert s.meta["person"] in s.question and s.context.count(s.meta["person"]) == 1
        (answer,) = s.answers
        sentence = next(x for x in re.split(r"(?<=\.) ", s.context) if s.meta["person"] in x)
        assert answer in sentence
