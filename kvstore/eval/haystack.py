"""Haystack text for synthetic long-context tasks, sized in tokens, with needles at chosen depths.

Two sources: generated English filler (the default, so the project needs no data files) and a folder of
.txt files (e.g. Paul Graham essays). Lengths are measured with a caller-supplied `count_tokens` so the real
tokenizer can be used; `approx_tokens` stands in when none is given.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvstore.eval import wordlists as W

CountTokens = Callable[[str], int]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")
_FOOTNOTE_RE = re.compile(r"\s*\[\d+\]")
_GLUED_SENTENCE_RE = re.compile(r"(?<=[a-z][.!?])(?=[A-Z][a-z])")
_YC_BANNER_RE = re.compile(r"Want to start a startup\?\s*Get funded by\s*Y Combinator\.", re.IGNORECASE)


def approx_tokens(text: str) -> int:
    """Rough token count without a tokenizer: words plus punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def tokenizer_counter(tokenizer: Any) -> CountTokens:
    """A `count_tokens` from a Hugging Face tokenizer (no special tokens added)."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


class Haystack(Protocol):
    """An endless, seed-deterministic stream of filler sentences."""

    name: str

    def sentences(self, seed: int) -> Iterator[str]: ...


_TEMPLATES: tuple[str, ...] = (
    "{name} {vt} the {adj} {noun} {time}.",
    "{time}, {name} {vi} {place}.",
    "The {noun} near {place} was {adj} and {adj2}.",
    "{name} said that the {noun} in {place} looked {adj} {time}.",
    "Nobody expected the {noun} to be so {adj}, {reason}.",
    "{name} and {name2} {vt} {a_adj} {noun} {reason}.",
    "There was {a_adj} {noun} beside the {noun2}, and {name} {vt} it carefully.",
    "When {name} reached {place}, the {noun} was already {adj}.",
    "{name} kept {a_adj} {noun} on the shelf {reason}.",
    "It was {adj} at {place} {time}, so {name} {vt} the {noun}.",
    "According to {name}, the best {noun} in town could be found at {place}.",
    "{name} wrote a short note about the {adj} {noun} and left it at {place}.",
    "Later, {name} {vi} {place} and thought about the {noun}.",
    "The {adj} {noun} belonged to {name}, who had found it {time}.",
    "Some people at {place} believed the {noun} was {adj}, but {name} disagreed.",
    "{name} asked {name2} whether the {noun} at {place} was still {adj}.",
    "{a_adj} {noun} rolled across the floor while {name} {vi} {place}.",
    "{name} {vt} the {noun} and the {noun2} {time}, {reason}.",
)


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


@dataclass(frozen=True)
class GeneratedHaystack:
    """Plausible, varied everyday-English sentences from templates and word lists; no digits, no needle words."""

    name: str = "generated"
    observation_rate: float = 0.12

    def sentence(self, rng: random.Random) -> str:
        if rng.random() < self.observation_rate:
            return rng.choice(W.OBSERVATIONS)
        name, name2 = rng.sample(W.FILLER_NAMES, 2)
        adj, adj2 = rng.sample(W.ADJECTIVES, 2)
        noun, noun2 = rng.sample(W.NOUNS, 2)
        fields = {
            "name": name,
            "name2": name2,
            "adj": adj,
            "adj2": adj2,
            "a_adj": f"{W.article(adj)} {adj}",
            "noun": noun,
            "noun2": noun2,
            "place": rng.choice(W.PLACES),
            "time": rng.choice(W.TIMES),
            "vt": rng.choice(W.TRANSITIVE_VERBS),
            "vi": rng.choice(W.MOTION_VERBS),
            "reason": rng.choice(W.REASONS),
        }
        return _cap(rng.choice(_TEMPLATES).format(**fields))

    def sentences(self, seed: int) -> Iterator[str]:
        rng = random.Random(f"generated-haystack/{seed}")
        while True:
            yield self.sentence(rng)


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences of a prose text (banner and footnote marks removed, fragments dropped)."""
    text = _YC_BANNER_RE.sub(" ", text)
    text = _FOOTNOTE_RE.sub("", text)
    text = _GLUED_SENTENCE_RE.sub(" ", text)  # "wound.The" -> "wound. The"
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_SPLIT_RE.split(text) if len(s.split()) >= 3]


class FolderHaystack:
    """Sentences of every .txt file in a folder, read in name order; a seed picks where the stream starts."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.txt"))
        self._sentences: list[str] = []
        for path in files:
            self._sentences.extend(split_sentences(path.read_text(encoding="utf-8", errors="replace")))
        if not self._sentences:
            raise ValueError(f"haystack folder {self.folder} has no .txt files with usable sentences")
        self.name = f"folder:{self.folder.name}"

    def __len__(self) -> int:
        return len(self._sentences)

    def sentences(self, seed: int) -> Iterator[str]:
        start = random.Random(f"folder-haystack/{seed}").randrange(len(self._sentences))
        i = start
        while True:
            yield self._sentences[i]
            i = (i + 1) % len(self._sentences)


def get_haystack(source: Haystack | str | Path | None = None) -> Haystack:
    """None or "generated" -> GeneratedHaystack; a folder path -> FolderHaystack; a Haystack passes through."""
    if source is None or (isinstance(source, str) and source == "generated"):
        return GeneratedHaystack()
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_dir():
            raise ValueError(f"haystack must be 'generated' or an existing folder of .txt files, got {source!r}")
        return FolderHaystack(path)
    return source


@dataclass(frozen=True)
class Needle:
    """A sentence to plant at `depth` (0 = start of the haystack, 1 = end), at a sentence boundary."""

    text: str
    depth: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {self.depth}")


def insert_needles(sentences: Sequence[str], needles: Sequence[Needle], weights: Sequence[int]) -> list[str]:
    """Place each needle at the sentence boundary nearest its depth (by cumulative `weights`, e.g. tokens).

    Needles at the same boundary keep their order, sorted by depth first.
    """
    cumulative = [0]
    for w in weights:
        cumulative.append(cumulative[-1] + w)
    total = cumulative[-1]
    at: dict[int, list[str]] = {}
    for needle in sorted(needles, key=lambda n: n.depth):
        target = needle.depth * total
        j = bisect.bisect_left(cumulative, target)
        if j > 0 and (j == len(cumulative) or target - cumulative[j - 1] <= cumulative[j] - target):
            j -= 1
        at.setdefault(j, []).append(needle.text)
    out: list[str] = []
    for b in range(len(sentences) + 1):
        out.extend(at.get(b, ()))
        if b < len(sentences):
            out.append(sentences[b])
    return out


def fit_length(render: Callable[[int], str], target: int, count_tokens: CountTokens, lo: int, hi: int) -> str:
    """The `render(k)`, k in [lo, hi], whose token count is nearest `target` (render must grow with k)."""
    best_k = lo
    a, b = lo, hi
    while a <= b:  # largest k with count <= target
        mid = (a + b) // 2
        if count_tokens(render(mid)) <= target:
            best_k, a = mid, mid + 1
        else:
            b = mid - 1
    candidates = {best_k, min(best_k + 1, hi)}
    texts = {k: render(k) for k in candidates}
    return min(texts.values(), key=lambda t: (abs(count_tokens(t) - target), len(t)))


def build_context(
    n_tokens: int,
    needles: Sequence[Needle] = (),
    haystack: Haystack | str | Path | None = None,
    seed: int = 0,
    count_tokens: CountTokens = approx_tokens,
) -> str:
    """Filler text of about `n_tokens` tokens in total (needles included), needles at their depths."""
    source = get_haystack(haystack)
    stream = source.sentences(seed)
    needle_cost = sum(count_tokens(n.text) for n in needles)
    pool: list[str] = []
    weights: list[int] = []
    drawn = 0

    def render(k: int) -> str:
        return " ".join(insert_needles(pool[:k], needles, weights[:k]))

    def grow(until: int) -> None:
        nonlocal drawn
        while drawn < until:
            sentence = next(stream)
            pool.append(sentence)
            weights.append(max(1, count_tokens(" " + sentence)))
            drawn += weights[-1]

    grow(int(1.2 * max(0, n_tokens - needle_cost)) + 64)
    while count_tokens(render(len(pool))) <= n_tokens:  # the estimate fell short: draw more
        grow(2 * drawn)
    return fit_length(render, n_tokens, count_tokens, 0, len(pool))


def filler(
    n_tokens: int,
    haystack: Haystack | str | Path | None = None,
    seed: int = 0,
    count_tokens: CountTokens = approx_tokens,
) -> str:
    """Plain filler text of about `n_tokens` tokens (no needles)."""
    return build_context(n_tokens, (), haystack, seed, count_tokens)
