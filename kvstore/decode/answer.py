"""An answer: its text, and what produced it. No torch here, so a queue client can hold answers too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Source:
    """One stored context an answer was decoded from: what a RAG user cites next to the answer."""

    id: str
    source: str  # the document's path or name as ingested ("" when none was given)
    part: int  # 0-based part of the document
    parts: int
    score: float | None = None  # BM25 score, when the context was retrieved for the question

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (a subclass such as a search hit gives only these)."""
        return {f.name: getattr(self, f.name) for f in fields(Source)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Source:
        """The source `to_dict` described."""
        return cls(raw["id"], raw["source"], raw["part"], raw["parts"], raw.get("score"))


class Answer(str):
    """An answer's text (a plain str), carrying what produced it."""

    contexts: tuple[str, ...]  # ids of the stored contexts the answer was decoded from, in prompt order
    prompt_tokens: int  # context (original length) + question tokens
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_new_tokens)
    sources: tuple[Source, ...]  # the same contexts with their documents and parts (and scores, if retrieved)

    def __new__(
        cls,
        text: str,
        contexts: Sequence[str],
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str,
        sources: Sequence[Source] = (),
    ) -> Answer:
        answer = super().__new__(cls, text)
        answer.contexts = tuple(contexts)
        answer.prompt_tokens = prompt_tokens
        answer.completion_tokens = completion_tokens
        answer.finish_reason = finish_reason
        answer.sources = tuple(sources)
        return answer

    def __getnewargs__(self) -> tuple[object, ...]:  # copy and pickle rebuild it with its fields
        return str(self), self.contexts, self.prompt_tokens, self.completion_tokens, self.finish_reason, self.sources

    def cited(self, sources: Sequence[Source]) -> Answer:
        """This answer with its contexts described by `sources` (decoding knows only their ids)."""
        return Answer(str(self), self.contexts, self.prompt_tokens, self.completion_tokens, self.finish_reason, sources)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields: how an answer travels back from a queued task (`sources` only when known)."""
        fields_ = {
            "text": str(self),
            "contexts": list(self.contexts),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }
        return {**fields_, "sources": [s.to_dict() for s in self.sources]} if self.sources else fields_

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Answer:
        """The answer `to_dict` described (a queued task's result), typed again."""
        sources = [Source.from_dict(s) for s in raw.get("sources", ())]
        return cls(
            raw["text"], raw["contexts"], raw["prompt_tokens"], raw["completion_tokens"], raw["finish_reason"], sources
        )
