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

from kvstore.engine.attention import observing
from kvstore.engine.lse import attention_with_lse, merge_attention
from kvstore.presses.base import ScoringInput, TokenPress
from kvstore.presses.budget import Scores
from kvstore.presses.registry import register
from kvstore.text.prompt import encode

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
PRECISIONS: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "model": None}


# Score elements materialised at once while taking the max over queries: a block that stays in
# cache (about 2 MB) makes the matmul + max twice as fast as one large block.
_MAX_SCORE_ELEMENTS = 1 << 19


@dataclass
class ChunkObserver:
    """Scores one document chunk during the reconstruction pass, and computes that pass's attention.

    Fused attention yields the layer's output and each query's log-sum-exp over the reduced set
    (template prefix + chunk + reconstruction); the KVzip score of a chunk key is the max over
    queries of exp(logit - lse_reduced), taken as one matmul of [q * scale, -lse] with [k, 1].
    With `dtype` set, the pass attends in that dtype and the score logits use the same rounded
    queries and keys (accumulated in float32), so scores and log-sum-exps stay consistent.
    """

    scores: Scores
    prefix_length: int
    context_length: int
    chunk_start: int  # absolute positions of the chunk in the context
    chunk_stop: int
    dtype: torch.dtype | None = None  # None: the model's own dtype

    def _attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output over all keys, log-sum-exp over the reduced set), for the cost of one pass over all keys.

        Keys split into contiguous slices (no gathered copy): the reduced context keys (template
        prefix, chunk), the other context keys (before and after the chunk) and the reconstruction
        tokens' own keys (causal); the partial attentions merge by their log-sum-exps.
        """
        p, t = self.prefix_length, self.context_length
        spans = {
            "prefix": (0, p),
            "chunk": (self.chunk_start, self.chunk_stop),
            "before": (p, self.chunk_start),
            "after": (self.chunk_stop, t),
        }
        parts = {
            name: attention_with_lse(query, keys[:, :, a:b], values[:, :, a:b], scaling)
            for name, (a, b) in spans.items()
            if b > a
        }
        own = attention_with_lse(query, keys[:, :, t:], values[:, :, t:], scaling, causal=True)
        reduced = merge_attention(own, *(parts[n] for n in ("prefix", "chunk") if n in parts))
        rest = [parts[n] for n in ("before", "after") if n in parts]
        return (merge_attention(reduced, *rest)[0] if rest else reduced[0]), reduced[1]

    def observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        model_dtype = query.dtype
        if self.dtype is not None:
            query, key, value = query.to(self.dtype), key.to(self.dtype), value.to(self.dtype)
        dim = query.shape[-1]
        kv_heads = key.shape[1]
        output, lse = self._attend(query, key, value, scaling)  # GQA without copying keys per query head
        # [Hkv, G*R, D + 1] rows of (q * scale, -lse) against [Hkv, C, D + 1] columns of (k, 1)
        rows = torch.cat([query[0].float() * scaling, -lse[0, :, :, None]], dim=-1).reshape(kv_heads, -1, dim + 1)
        chunk_keys = key[0, :, self.chunk_start : self.chunk_stop].float()
        cols = torch.cat([chunk_keys, chunk_keys.new_ones(*chunk_keys.shape[:2], 1)], dim=-1).transpose(1, 2)
        target = self.scores[layer_idx][:, self.chunk_start - self.prefix_length : self.chunk_stop - self.prefix_length]
        step = max(1, _MAX_SCORE_ELEMENTS // max(1, kv_heads * cols.shape[2]))
        best = torch.full_like(target, float("-inf"))
        for r0 in range(0, rows.shape[1], step):
            torch.maximum(best, torch.matmul(rows[:, r0 : r0 + step], cols).amax(dim=1), out=best)
        target.copy_(best.exp())
        return output.transpose(1, 2).to(model_dtype)


@register
@dataclass
class KVzipPress(TokenPress):
    name = "kvzip"
    budget: str = "floored"  # the global threshold with a per-layer floor (kvstore.presses.budget.floored_budget)
    chunk_size: int = 2000
    quoted_tokens: int = 8
    # The reconstruction pass attends in bfloat16, as the paper's code runs (2.4x faster attention on
    # CPUs with AMX / AVX512-BF16); "model" keeps the model's own dtype (exact float32 on CPU).
    precision: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown KVzip precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def _prompt_ids(self, run: ScoringInput, previous_chunk: torch.Tensor | None) -> list[int]:
        tokenizer = run.loaded.frame.tokenizer
        if previous_chunk is None:
            return encode(tokenizer, FIRST_PROMPT) + run.loaded.frame.tail_ids
        quoted = previous_chunk[-self.quoted_tokens :].tolist()
        return encode(tokenizer, NEXT_PROMPT) + quoted + run.loaded.frame.tail_ids

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
            observer = ChunkObserver(scores, run.prefix_length, run.length, start, stop, PRECISIONS[self.precision])
            with observing(observer):
                model(input_ids=recon, cache=run.cache, use_cache=True, logits_to_keep=1)
            run.cache.crop(-recon.shape[1])  # the reconstruction tokens are not part of the context
            previous = chunk
            if run.progress is not None:
                run.progress(stop - run.prefix_length)
        return scores
