"""The question of a chat request: its OpenAI messages folded into the one user turn a context answers.

OpenAI clients and RAG frameworks send a system message and earlier turns along with the question,
but a stored context's chat-template head (its system prompt and the user header) was fixed at
ingest, and a question is appended after the document as the rest of that one user turn. So the
messages become that turn's text, as plain text, in this order, sections separated by a blank line:

1. the text of every `system` (or `developer`) message, in order;
2. every earlier `user` / `assistant` message, as "User: <text>" / "Assistant: <text>", in order;
3. the last message, which must be the user's: the question itself, as is.

Each text is stripped of surrounding whitespace, and messages without text are left out; a
request with a single user message asks exactly that message's text. Anything else is refused
with an InputError (400): a last message that is not the user's, or an empty question (the schema
already refuses other roles and non-text content parts).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.errors import InputError
from kvstore.server.schemas import Message

_SPEAKERS = {"user": "User", "assistant": "Assistant"}


def fold(messages: Sequence[Message]) -> str:
    """The question text for these messages (see the module docstring)."""
    if not messages or messages[-1].role != "user":
        last = messages[-1].role if messages else "none"
        raise InputError(f"the last message must be the user's question, got a {last!r} message")
    *earlier, last = messages
    question = last.text.strip()
    if not question:
        raise InputError("the question (the last user message) is empty")
    instructions = [m.text.strip() for m in earlier if m.role not in _SPEAKERS]
    turns = [f"{_SPEAKERS[m.role]}: {m.text.strip()}" for m in earlier if m.role in _SPEAKERS and m.text.strip()]
    return "\n\n".join([*filter(None, instructions), *turns, question])
