"""An answer: its text, and what produced it. No torch here, so a queue client can hold answers too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class Answer(str):
    """An answer's text (a plain str), carrying what produced it."""

    contexts: tuple[str, ...]  # ids of the stored contexts the answer was decoded from, in prompt order
    prompt_tokens: int  # context (original length) + question tokens
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_new_tokens)

    def __new__(
        cls, text: str, contexts: Sequence[str], prompt_tokens: int, completion_tokens: int, finish_reason: str
    ) -> Answer:
        answer = super().__new__(cls, text)
        answer.contexts = tuple(contexts)
        answer.prompt_tokens = prompt_tokens
        answer.completion_tokens = completion_tokens
        answer.finish_reason = finish_reason
        return answer

    def __getnewargs__(self) -> tuple[object, ...]:  # copy and pickle rebuild it with its fields
        return str(self), self.contexts, self.prompt_tokens, self.completion_tokens, self.finish_reason

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields: how an answer travels back from a queued task."""
        return {
            "text": str(self),
            "contexts": list(self.contexts),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Answer:
        """The answer `to_dict` described (a queued task's result), typed again."""
        return cls(raw["text"], raw["contexts"], raw["prompt_tokens"], raw["completion_tokens"], raw["finish_reason"])
