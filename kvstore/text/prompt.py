"""Token layout of a context and its questions, derived from the model's chat template.

context  = head (system + user header)  + document
question = "\n\n" + question + tail (end of user turn + assistant header)

The head is the never-evicted template prefix; the tail also closes KVzip's repeat prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

_MARKER = "\u2063KVSTORE-CONTENT\u2063"
_FALLBACK_TAIL = "\nAnswer:"


@dataclass(frozen=True)
class ChatFrame:
    """The chat template split around the user message's content."""

    head_ids: list[int]
    tail_ids: list[int]
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ChatFrame:
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
            )
            head, tail = rendered.split(_MARKER)
        else:
            head, tail = tokenizer.bos_token or "", _FALLBACK_TAIL
        return cls(encode(tokenizer, head), encode(tokenizer, tail), tokenizer)

    def context_ids(self, document: str | Sequence[int]) -> torch.Tensor:
        """int64 [1, T] ids of head + document (its text, or its token ids when already tokenized)."""
        ids = encode(self.tokenizer, document) if isinstance(document, str) else list(document)
        return torch.tensor([self.head_ids + ids])

    def question_ids(self, question: str) -> list[int]:
        return encode(self.tokenizer, "\n\n" + question.strip()) + self.tail_ids

    def stop_ids(self) -> set[int]:
        """Tokens that end an answer: EOS and the last special token of the tail's turn end."""
        stops = {self.tokenizer.eos_token_id} - {None}
        end_of_turn = self.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>", "<end_of_turn>"])
        return stops | {i for i in end_of_turn if i is not None and i != self.tokenizer.unk_token_id}


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
