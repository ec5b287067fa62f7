"""Time to first token from stored, composed contexts vs prefilling the joint documents again.

    python benchmarks/compose_bench.py --docs 4 --tokens 700 --repeats 5 --haystack ../shared/data/haystack

Each document is compressed once (KVzip at --ratio) and stored. Then, interleaved `--repeats`
times: (a) from a cold client state, load the stored blobs, compose them and decode the first
answer token; (b) prefill the head + all documents + the question and decode the first token (what
a system without a store does). Prints both medians and their ratio, plus the memory each holds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvstore.compress import compress
from kvstore.config import Settings
from kvstore.decode.cache import CompressedCache
from kvstore.decode.compose import compose
from kvstore.decode.generation import GenerationOptions, decode_tokens
from kvstore.engine.models import load_model
from kvstore.engine.prefill import prefill
from kvstore.eval.haystack import filler, tokenizer_counter
from kvstore.presses import parse_press_spec
from kvstore.storage.store import ContextMeta, ContextStore
from kvstore.text.prompt import encode

QUESTION = "What is the special magic number mentioned in the documents?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=700, help="tokens per document")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--haystack", default=None)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", Settings(device="cpu"))
    count = tokenizer_counter(loaded.tokenizer)
    documents = [filler(args.tokens, args.haystack, seed=100 + i, count_tokens=count) for i in range(args.docs)]
    press = parse_press_spec("kvzip", args.ratio)
    frame = loaded.frame
    question = frame.question_ids(QUESTION)
    first = GenerationOptions(max_new_tokens=1)
    with tempfile.TemporaryDirectory() as home, ContextStore.open(Settings(home=Path(home), redis_url=None)) as store:
        ids = []
        for i, document in enumerate(documents):
            meta = ContextMeta.for_model(loaded, press.params(), source=f"doc{i}")
            ids.append(store.put(compress(loaded, document, press), meta)[0].id)

        def stored() -> int:
            parts = [store.load(i, loaded.fingerprint) for i in ids]
            cache = CompressedCache(compose(loaded, parts), device=loaded.device)
            next(iter(decode_tokens(loaded, cache, [question], frame.stop_ids(), first)))
            return cache.nbytes

        @torch.inference_mode()
        def joint() -> int:
            context = frame.head_ids + [t for d in documents for t in encode(loaded.tokenizer, d)]
            cache = prefill(loaded.model, torch.tensor([context + question[:-1]]))
            loaded.model(input_ids=torch.tensor([question[-1:]]), cache=cache, logits_to_keep=1)
            return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)

        stored(), joint()  # warm-up: one-time costs out of the figures
        times: dict[str, list[float]] = {"stored": [], "joint": []}
        sizes = {}
        for _ in range(args.repeats):
            for name, run in (("stored", stored), ("joint", joint)):
                start = time.perf_counter()
                sizes[name] = run()
                times[name].append(time.perf_counter() - start)
    tokens = len(frame.head_ids) + sum(len(encode(loaded.tokenizer, d)) for d in documents)
    stored_s, joint_s = statistics.median(times["stored"]), statistics.median(times["joint"])
    print(f"{args.docs} documents x ~{args.tokens} tokens = {tokens:,} context tokens; KVzip {args.ratio}")
    print(f"time to first token, stored + composed: {stored_s * 1000:.0f} ms (median of {args.repeats})")
    print(f"time to first token, joint prefill:     {joint_s * 1000:.0f} ms")
    print(f"speed-up: {joint_s / stored_s:.1f}x")
    print(f"KV in memory: composed {sizes['stored'] / 2**20:.1f} MiB, joint {sizes['joint'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
