"""Request bodies of the HTTP API: the OpenAI chat-completions format plus kvstore's extension fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; `kvstore.server.messages` folds them into the question. Tool messages and
    non-text content (images, audio) have no meaning for a stored context and are refused."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Retrieve(BaseModel):
    """Search the store for the question first and compose the top `k` contexts that fit."""

    k: int = Field(4, ge=1, le=64)


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. `contexts` (ids or id prefixes, composed in order) or `retrieve`
    name the stored contexts; unknown OpenAI fields are ignored, unsupported values refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    contexts: list[str] | None = Field(None, min_length=1, max_length=64)
    retrieve: Retrieve | None = None


class IngestRequest(BaseModel):
    """POST /v1/contexts: a document's text (and where it came from)."""

    text: str = Field(min_length=1)
    source: str = ""
