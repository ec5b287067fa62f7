"""RULER-style synthetic tasks, generated offline and deterministically from a seed.

Each `Sample` keeps the context (compressed and stored first) apart from the question (asked only after
loading), so the protocol stays question-agnostic. Families follow the seed poster: "retrieval" (needles,
planted-fact QA) and "aggregation" (variable tracking, common/frequent words), which gather many scattered
pieces. A sample's randomness depends only on (seed, task, context_tokens, index), so suites are stable
whatever other tasks they contain.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvstore.eval import wordlists as W
from kvstore.eval.haystack import CountTokens, Haystack, Needle, approx_tokens, build_context, fit_length, get_haystack
from kvstore.eval.metrics import score

RETRIEVAL = "retrieval"
AGGREGATION = "aggregation"
MULTI_DOCUMENT = "multi-document"
DOCUMENTS = 4  # documents per multi-document sample, together `context_tokens` long (as a joint prefill sees them)

NIAH_NEEDLE = "The special magic number for {key} is {value}."
NIAH_QUESTION = "What is the special magic number for {key}?"


@dataclass(frozen=True)
class Sample:
    """One evaluation case: compress `context`, then ask `question`; score with `metric` against `answers`."""

    id: str
    task: str
    family: str
    context: str
    question: str
    answers: list[str]
    metric: str
    meta: dict[str, Any] = field(default_factory=dict)
    # Multi-document samples: the documents, stored separately and composed; `context` is their joint text.
    documents: tuple[str, ...] = ()

    def score(self, answer: str) -> float:
        """Score a model's answer in [0, 1] with this sample's metric."""
        return score(self.metric, answer, self.answers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Request:
    """Everything one sample's builder may use."""

    rng: random.Random
    context_tokens: int
    haystack: Haystack
    count_tokens: CountTokens
    depth: float  # evenly spread over the cases of a task; used by single-needle tasks

    def context(self, needles: Sequence[Needle], tokens: int | None = None) -> str:
        seed = self.rng.randrange(2**31)
        return build_context(tokens or self.context_tokens, needles, self.haystack, seed, self.count_tokens)

    def documents(self, needles: Sequence[Sequence[Needle]]) -> tuple[str, ...]:
        """One document per list of needles, `context_tokens` in all (each from its own stretch of filler)."""
        return tuple(self.context(doc_needles, self.context_tokens // len(needles)) for doc_needles in needles)

    def depths(self, k: int) -> list[float]:
        return [round(self.rng.random(), 4) for _ in range(k)]


# context (or the documents of a multi-document sample), question, answers, meta
_Built = tuple[str | tuple[str, ...], str, list[str], dict[str, Any]]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its family and metric, and the builder of one sample."""

    name: str
    family: str
    metric: str
    build: Callable[[_Request], _Built]


def _keys(rng: random.Random, k: int) -> list[str]:
    """k needle keys like "quiet-lantern", distinct in both words."""
    adjectives = rng.sample(W.ADJECTIVES, k)
    nouns = rng.sample(W.NOUNS, k)
    return [f"{a}-{n}" for a, n in zip(adjectives, nouns, strict=True)]


def _numbers(rng: random.Random, k: int, digits: int = 7) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def _niah_single(req: _Request) -> _Built:
    (key,), (value,) = _keys(req.rng, 1), _numbers(req.rng, 1)
    context = req.context([Needle(NIAH_NEEDLE.format(key=key, value=value), req.depth)])
    return context, NIAH_QUESTION.format(key=key), [value], {"depth": req.depth, "key": key}


def _niah_multikey(req: _Request, n_keys: int = 4) -> _Built:
    keys, values, depths = _keys(req.rng, n_keys), _numbers(req.rng, n_keys), req.depths(n_keys)
    needles = [Needle(NIAH_NEEDLE.format(key=k, value=v), d) for k, v, d in zip(keys, values, depths, strict=True)]
    return req.context(needles), NIAH_QUESTION.format(key=keys[0]), [values[0]], {"depths": depths, "key": keys[0]}


def _niah_multivalue(req: _Request, n_values: int = 4) -> _Built:
    (key,), values, depths = _keys(req.rng, 1), _numbers(req.rng, n_values), req.depths(n_values)
    needles = [Needle(NIAH_NEEDLE.format(key=key, value=v), d) for v, d in zip(values, depths, strict=True)]
    question = f"What are all the special magic numbers for {key}?"
    return req.context(needles), question, values, {"depths": depths, "key": key}


def _niah_multiquery(req: _Request, n_keys: int = 4) -> _Built:
    keys, values, depths = _keys(req.rng, n_keys), _numbers(req.rng, n_keys), req.depths(n_keys)
    needles = [Needle(NIAH_NEEDLE.format(key=k, value=v), d) for k, v, d in zip(keys, values, depths, strict=True)]
    question = f"What are the special magic numbers for {', '.join(keys[:-1])} and {keys[-1]}?"
    return req.context(needles), question, values, {"depths": depths, "keys": keys}


def _variable_tracking(req: _Request, n_chains: int = 2, n_hops: int = 4) -> _Built:
    """Chains VAR A = 12345, VAR B = VAR A, ...; the queried chain's variables are the answer."""
    rng = req.rng
    names: list[str] = []
    while len(names) < n_chains * (n_hops + 1):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    values = _numbers(rng, n_chains, digits=5)
    needles: list[Needle] = []
    for c in range(n_chains):
        chain = names[c * (n_hops + 1) : (c + 1) * (n_hops + 1)]
        depths = sorted(req.depths(n_hops + 1))
        needles.append(Needle(f"VAR {chain[0]} = {values[c]}.", depths[0]))
        needles += [Needle(f"VAR {b} = VAR {a}.", d) for a, b, d in zip(chain[:-1], chain[1:], depths[1:], strict=True)]
    answers = names[: n_hops + 1]
    question = f"Find all variables that are assigned the value {values[0]}."
    return req.context(needles), question, answers, {"value": values[0]}


def _common_words(req: _Request, n_common: int = 10) -> _Built:
    """A numbered word list: `n_common` words repeat often, the rest rarely (RULER's CWE)."""
    rng, count = req.rng, req.count_tokens
    words = rng.sample(W.NOUNS, len(W.NOUNS))
    common, rare = words[:n_common], words[n_common:]
    shuffle_seed = rng.randrange(2**31)
    preamble = "Below is a numbered list of words."

    def render(common_freq: int, rare_freq: int, n_rare: int) -> str:
        entries = common * common_freq + rare[:n_rare] * rare_freq
        random.Random(shuffle_seed).shuffle(entries)
        return preamble + "\n" + " ".join(f"{i}. {w}" for i, w in enumerate(entries, 1))

    trial = render(1, 1, min(len(rare), 200))
    per_entry = max(1.0, (count(trial) - count(preamble)) / (n_common + min(len(rare), 200)))
    entries = max(1.0, req.context_tokens / per_entry)
    rare_freq = max(1, -(-int(0.7 * entries) // int(0.8 * len(rare))))
    common_freq = max(rare_freq + 2, round(0.3 * entries / n_common))
    while True:  # rarely more than once: raise the rare frequency when the vocabulary cannot fill the length
        if (
            count(render(common_freq, rare_freq, len(rare))) >= req.context_tokens
            or common_freq > 10 * req.context_tokens
        ):
            break
        rare_freq += 1
        common_freq = max(common_freq, rare_freq + 2)
    context = fit_length(lambda k: render(common_freq, rare_freq, k), req.context_tokens, count, 0, len(rare))
    question = f"What are the {n_common} most common words in the list above?"
    return context, question, common, {"common_freq": common_freq, "rare_freq": rare_freq}


def _coded_words(rng: random.Random, k: int, exclude: set[str]) -> list[str]:
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    while len(out) < k:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if word not in exclude and word not in out:
            out.append(word)
    return out


def _frequent_words(req: _Request, n_top: int = 3, alpha: float = 2.0) -> _Built:
    """A text of made-up words with Zipf frequencies; the `n_top` most frequent are the answer (RULER's FWE)."""
    rng, count = req.rng, req.count_tokens
    preamble = "Below is a coded text made of made-up words."
    exclude = {w.lower().strip(".") for w in preamble.split()} | set(W.NOUNS) | set(W.ADJECTIVES)
    probe = " ".join(_coded_words(random.Random(0), 100, exclude))
    entries = max(1.0, req.context_tokens * 100 / max(1, count(probe)))
    vocab = _coded_words(rng, max(20, min(1000, int(entries) // 4)), exclude)
    shuffle_seed = rng.randrange(2**31)

    def counts(scale: int) -> list[int]:
        return [max(1, int(scale / r**alpha)) for r in range(1, len(vocab) + 1)]

    def render(scale: int) -> str:
        text = [w for w, c in zip(vocab, counts(scale), strict=True) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(text)
        return preamble + "\n" + " ".join(text)

    low = 1  # the smallest scale whose top n_top counts stay strictly above all others
    while not all(a > b for a, b in itertools.pairwise(counts(low)[: n_top + 1])):
        low += 1
    context = fit_length(render, req.context_tokens, count, low, max(low, 4 * int(entries)))
    question = f"What are the {n_top} most frequent coded words in the text above?"
    return context, question, vocab[:n_top], {"vocab_size": len(vocab)}


_FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("{person} lives in the town of {value}.", "In which town does {person} live?", W.TOWNS),
    ("{person} works as {article} {value}.", "What is {person}'s job?", W.JOBS),
    ("{person} has a dog named {value}.", "What is the name of {person}'s dog?", W.DOG_NAMES),
)


def _qa(req: _Request) -> _Built:
    """One fact of each kind, each about a different person; the question asks one of them."""
    rng = req.rng
    facts = rng.sample(_FACTS, len(_FACTS))
    firsts, lasts = rng.sample(W.FACT_FIRST_NAMES, len(facts)), rng.sample(W.FACT_LAST_NAMES, len(facts))
    people = [f"{f} {last}" for f, last in zip(firsts, lasts, strict=True)]
    values = [rng.choice(pool) for _, _, pool in facts]
    needles = [
        Needle(fact.format(person=p, value=v, article=W.article(v)), d)
        for (fact, _, _), p, v, d in zip(facts, people, values, req.depths(len(facts)), strict=True)
    ]
    question = facts[0][1].format(person=people[0])
    return req.context(needles), question, [values[0]], {"person": people[0]}


def _multidoc_needle(req: _Request) -> _Built:
    """One needle per document, each with its own key; the question asks one of them."""
    keys, values = _keys(req.rng, DOCUMENTS), _numbers(req.rng, DOCUMENTS)
    depths = req.depths(DOCUMENTS)
    documents = req.documents(
        [[Needle(NIAH_NEEDLE.format(key=k, value=v), d)] for k, v, d in zip(keys, values, depths, strict=True)]
    )
    target = req.rng.randrange(DOCUMENTS)
    meta = {"target_document": target, "key": keys[target], "depths": depths}
    return documents, NIAH_QUESTION.format(key=keys[target]), [values[target]], meta


_HOP_1 = "{person} lives in the town of {town}."
_HOP_2 = "The mayor of {town} is called {mayor}."
_TWO_HOP_QUESTION = "What is the name of the mayor of the town where {person} lives?"


def _two_hop(req: _Request) -> _Built:
    """Where a person lives is in one document, who is that town's mayor in another; a decoy pair elsewhere."""
    rng = req.rng
    firsts = rng.sample(W.FACT_FIRST_NAMES, 4)  # fact names never appear in the filler text
    people = [f"{f} {last}" for f, last in zip(firsts[:2], rng.sample(W.FACT_LAST_NAMES, 2), strict=True)]
    towns, mayors = rng.sample(W.TOWNS, 2), firsts[2:]
    facts = [
        _HOP_1.format(person=people[0], town=towns[0]),
        _HOP_2.format(town=towns[0], mayor=mayors[0]),
        _HOP_1.format(person=people[1], town=towns[1]),
        _HOP_2.format(town=towns[1], mayor=mayors[1]),
    ]
    order = rng.sample(range(DOCUMENTS), DOCUMENTS)  # document i holds fact order[i]
    documents = req.documents([[Needle(facts[i], round(rng.random(), 4))] for i in order])
    meta = {"person": people[0], "town": towns[0], "fact_documents": [order.index(0), order.index(1)]}
    return documents, _TWO_HOP_QUESTION.format(person=people[0]), [mayors[0]], meta


def _long_document(req: _Request) -> _Built:
    """One document with one needle, stored in DOCUMENTS parts and answered whole (through `ask DOC`)."""
    (key,), (value,) = _keys(req.rng, 1), _numbers(req.rng, 1)
    text = req.context([Needle(NIAH_NEEDLE.format(key=key, value=value), req.depth)])
    return text, NIAH_QUESTION.format(key=key), [value], {"depth": req.depth, "key": key, "parts": DOCUMENTS}


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single", RETRIEVAL, "contains_all", _niah_single),
        TaskSpec("niah_multikey", RETRIEVAL, "contains_all", _niah_multikey),
        TaskSpec("niah_multivalue", RETRIEVAL, "contains_all", _niah_multivalue),
        TaskSpec("niah_multiquery", RETRIEVAL, "contains_all", _niah_multiquery),
        TaskSpec("qa", RETRIEVAL, "contains_any", _qa),
        TaskSpec("variable_tracking", AGGREGATION, "word_recall", _variable_tracking),
        TaskSpec("common_words", AGGREGATION, "word_recall", _common_words),
        TaskSpec("frequent_words", AGGREGATION, "word_recall", _frequent_words),
        TaskSpec("multidoc_needle", MULTI_DOCUMENT, "contains_all", _multidoc_needle),
        TaskSpec("two_hop", MULTI_DOCUMENT, "contains_any", _two_hop),
        TaskSpec("long_document", MULTI_DOCUMENT, "contains_all", _long_document),
    )
}


def task_names(family: str | None = None) -> list[str]:
    """Registered task names, optionally only those of one family."""
    return [name for name, spec in TASKS.items() if family is None or spec.family == family]


def make_sample(
    task: str,
    index: int,
    n: int,
    context_tokens: int,
    seed: int = 0,
    haystack: Haystack | str | Path | None = None,
    count_tokens: CountTokens = approx_tokens,
    depth: float | None = None,
) -> Sample:
    """Case `index` of `n` of one task (its depth slot is (index + 0.5) / n unless `depth` is given)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    spec = TASKS[task]
    req = _Request(
        rng=random.Random(f"{seed}/{task}/{context_tokens}/{index}"),
        context_tokens=context_tokens,
        haystack=get_haystack(haystack),
        count_tokens=count_tokens,
        depth=(index + 0.5) / n if depth is None else depth,
    )
    built, question, answers, meta = spec.build(req)
    documents = built if isinstance(built, tuple) else ()
    context = "\n\n".join(documents) if documents else built
    missing = [a for a in answers if a not in context]
    if missing:  # a generator bug, never a property of the data
        raise RuntimeError(f"{task}: answers {missing} are not in the generated context")
    meta = {"context_tokens": context_tokens, "tokens": count_tokens(context), "haystack": req.haystack.name, **meta}
    sample_id = f"{task}-{context_tokens}-{seed}-{index}"
    return Sample(sample_id, task, spec.family, context, question, answers, spec.metric, meta, documents)


def make_suite(
    tasks: Sequence[str] | None,
    n: int,
    context_tokens: int,
    seed: int = 0,
    haystack: Haystack | str | Path | None = None,
    count_tokens: CountTokens = approx_tokens,
) -> list[Sample]:
    """`n` samples of each task (all registered tasks when `tasks` is None), task by task."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; accepted: {', '.join(TASKS)}")
    source = get_haystack(haystack)  # a folder is read once for the whole suite
    return [make_sample(t, i, n, context_tokens, seed, source, count_tokens) for t in names for i in range(n)]


def make_niah(
    n: int,
    context_tokens: int,
    seed: int = 0,
    haystack: Haystack | str | Path | None = None,
    count_tokens: CountTokens = approx_tokens,
    depths: Sequence[float] | None = None,
) -> list[Sample]:
    """`n` single-needle cases, depths spread evenly ((i + 0.5) / n) unless `depths` are given."""
    if depths is not None and len(depths) != n:
        raise ValueError(f"got {len(depths)} depths for {n} cases")
    source = get_haystack(haystack)
    return [
        make_sample(
            "niah_single", i, n, context_tokens, seed, source, count_tokens, None if depths is None else depths[i]
        )
        for i in range(n)
    ]
