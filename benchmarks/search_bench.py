"""Search at store scale: BM25 index build time and query time over thousands of stored texts.

    python benchmarks/search_bench.py --sizes 1000 5000 [--words 400] [--queries 50]

Why: retrieval (`KVStore.search`, `ask --retrieve`, `ask DOC` part selection) must stay fast as a
store grows, and a long-lived process (the server) must keep one index between questions. No model
and no blob: for each size a fresh store gets that many synthetic contexts (a record and a text of
`--words` Zipf-distributed words each, written straight to the index, documents of 4 parts). Prints
per size: the time to write them, the first search (it reads the records and texts and builds the
index), the median query, the median query filtered to one document's parts (as `ask DOC` ranks
them: it must not rebuild), and the first search after one more context is stored (a rebuild).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvstore.config import Settings
from kvstore.search import ContextSearch
from kvstore.storage.index import ContextRecord
from kvstore.storage.store import ContextStore

PARTS = 4  # parts per synthetic document


def synthetic_record(number: int) -> ContextRecord:
    """The index record of synthetic context `number` (part number % PARTS of its document); no blob."""
    cid = hashlib.sha256(f"synthetic {number}".encode()).hexdigest()
    document = hashlib.sha256(f"document {number // PARTS}".encode()).hexdigest()
    return ContextRecord(
        id=cid,
        model="synthetic",
        model_fingerprint="synthetic",
        tokenizer_fingerprint="synthetic",
        document_sha256=document,
        source=f"doc{number // PARTS}.txt",
        document_id=document,
        part=number % PARTS,
        parts=PARTS,
        original_length=0,
        prefix_length=0,
        kept_pairs=0,
        total_pairs=0,
        ratio_requested=0.0,
        ratio_achieved=0.0,
        press={"press": "none"},
        quant="none",
        blob_format="safetensors",
        blob="",
        bytes=0,
        full_bytes=0,
        dtype="float32",
        created=time.time(),
        checksum="",
    )


def vocabulary_sampler(size: int, seed: int) -> Callable[[int], str]:
    """Texts of `n` words drawn from `size` made-up words with Zipf frequencies (as natural text has)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i:05d}" for i in range(size)]
    weights = 1.0 / np.arange(1, size + 1)
    weights /= weights.sum()
    return lambda n: " ".join(words[i] for i in rng.choice(size, n, p=weights))


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench(size: int, words: int, queries: int) -> dict[str, float]:
    """Timings (seconds) for a fresh store of `size` synthetic contexts."""
    text = vocabulary_sampler(20_000, seed=size)
    questions = [text(8) for _ in range(queries)]
    with tempfile.TemporaryDirectory() as home, ContextStore.open(Settings(home=Path(home), redis_url=None)) as store:
        records = [synthetic_record(i) for i in range(size)]

        def write(batch: list[ContextRecord]) -> None:
            for record in batch:
                store.texts.put(record.id, text(words))  # the text first, as ingest writes it
                store.index.add(record)

        timings = {"write": seconds(lambda: write(records))}
        search = ContextSearch(store)
        timings["build"] = seconds(lambda: search.search(questions[0]))
        timings["query"] = statistics.median(seconds(lambda q=q: search.search(q)) for q in questions)
        document = {r.id for r in records[:PARTS]}
        timings["filtered"] = statistics.median(
            seconds(lambda q=q: search.search(q, k=PARTS, where=lambda r: r.id in document)) for q in questions
        )
        write([synthetic_record(size)])
        timings["rebuild"] = seconds(lambda: search.search(questions[0]))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="stored contexts per run")
    parser.add_argument("--words", type=int, default=400, help="words per stored text")
    parser.add_argument("--queries", type=int, default=50, help="timed queries per size (medians)")
    args = parser.parse_args()
    print("| contexts | write s | first search (build) ms | query ms | one document's parts ms | rebuild ms |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        t = bench(size, args.words, args.queries)
        print(
            f"| {size:,} | {t['write']:.1f} | {t['build'] * 1e3:.0f} | {t['query'] * 1e3:.1f} "
            f"| {t['filtered'] * 1e3:.1f} | {t['rebuild'] * 1e3:.0f} |"
        )


if __name__ == "__main__":
    main()
