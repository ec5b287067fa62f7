"""KVzip: a KV pair matters as much as the model needs it to reconstruct the context.

After the context is prefilled, the model is teacher-forced to repeat the document chunk by chunk
("Repeat the previous context exactly." ...). Each context key is scored by the largest attention
it receives from any reconstruction query of its GQA group, under a softmax restricted to the
template prefix, the chunk's own keys and the reconstruction tokens (causal). The score matrix is
chunk-local: its size does not grow with the document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.attention import observing
from kvstore.budget import Scores
from kvstore.presses.base import ScorerPress, ScoringInput
from kvstore.prompt import encode

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "


@dataclass
class ChunkObserver:
    """Scores one document chunk from the reconstruction pass's queries, layer by layer."""

    scores: Scores
    prefix_length: int
    context_length: int
    chunk_start: int  # absolute positions of the chunk in the context
    chunk_stop: int

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        keys = key[0]
        reduced = torch.cat(
            [
                keys[:, : self.prefix_length],
                keys[:, self.chunk_start : self.chunk_stop],
                keys[:, self.context_length :],
            ],
            dim=1,
        )  # [Hkv, P + C + R, D]
        kv_heads, n_recon = keys.shape[0], keys.shape[1] - self.context_length
        queries = query[0].reshape(kv_heads, -1, n_recon, query.shape[-1])  # [Hkv, G, R, D]
        first, last = self.prefix_length, self.prefix_length + self.chunk_stop - self.chunk_start
        causal = torch.ones(n_recon, n_recon, dtype=torch.bool, device=query.device).tril()
        allowed = torch.cat([causal.new_ones(n_recon, last), causal], dim=1)  # [R, P + C + R]
        target = self.scores[layer_idx][:, self.chunk_start - self.prefix_length : self.chunk_stop - self.prefix_length]
        scale = query.shape[-1] ** -0.5
        for head in range(kv_heads):  # one GQA group at a time keeps the score block small
            logits = torch.matmul(queries[head].float(), reduced[head].float().T) * scale  # [G, R, P + C + R]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            target[head] = probs[..., first:last].amax(dim=(0, 1))


@dataclass
class KVzipPress(ScorerPress):
    name = "kvzip"
    chunk_size: int = 2000
    quoted_tokens: int = 8

    def _prompt_ids(self, run: ScoringInput, previous_chunk: torch.Tensor | None) -> list[int]:
        tokenizer = run.frame.tokenizer
        if previous_chunk is None:
            return encode(tokenizer, FIRST_PROMPT) + run.frame.tail_ids
        quoted = previous_chunk[-self.quoted_tokens :].tolist()
        return encode(tokenizer, NEXT_PROMPT) + quoted + run.frame.tail_ids

    @torch.inference_mode()
    def score(self, run: ScoringInput) -> Scores:
        scores = run.zeros()
        model, ids = run.loaded.model, run.input_ids.to(run.loaded.device)
        previous = None
        for start in range(run.prefix_length, run.length, self.chunk_size):
            stop = min(run.length, start + self.chunk_size)
            chunk = ids[0, start:stop]
            recon = torch.tensor([self._prompt_ids(run, previous)], device=ids.device)
            recon = torch.cat([recon, chunk[None]], dim=1)
            observer = ChunkObserver(scores, run.prefix_length, run.length, start, stop)
            with observing(observer):
                model(input_ids=recon, past_key_values=run.cache, use_cache=True, logits_to_keep=1)
            run.cache.crop(-recon.shape[1])  # the reconstruction tokens are not part of the context
            previous = chunk
        return scores
