"""RAG over stored contexts: retrieve the relevant documents, load their compressed caches, answer from each.

    python examples/rag.py "What color is the lighthouse door?" --ingest examples/docs

No document is prefilled at question time: each answer decodes against a stored, compressed KV cache.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter

from kvstore import KVStore
from kvstore.storage.index import ContextRecord

WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = {"the", "a", "an", "of", "to", "is", "in", "and", "what", "who", "when", "how", "was", "did", "does"}


def words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS]


def bm25_rank(question: str, documents: dict[str, str], k1: float = 1.2, b: float = 0.75) -> list[tuple[str, float]]:
    """Plain BM25 over the stored documents' text: good enough to pick a handful of contexts."""
    bags = {key: Counter(words(text)) for key, text in documents.items()}
    average = sum(sum(bag.values()) for bag in bags.values()) / max(1, len(bags))
    scores = {}
    for key, bag in bags.items():
        length = sum(bag.values())
        score = 0.0
        for term in set(words(question)):
            having = sum(term in other for other in bags.values())
            idf = math.log(1 + (len(bags) - having + 0.5) / (having + 0.5))
            tf = bag[term]
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average)) if tf else 0.0
        scores[key] = score
    return sorted(scores.items(), key=lambda item: -item[1])


def document_text(kv: KVStore, record: ContextRecord) -> str:
    """The context's own text, decoded from the token ids stored in its blob (template prefix dropped)."""
    compressed = kv.store.load(record.id)
    loaded = kv.model(record.model)
    return loaded.tokenizer.decode(compressed.token_ids[compressed.prefix_length :].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--ingest", nargs="*", default=[], help="files or folders to ingest first")
    parser.add_argument("--top", type=int, default=2, help="how many contexts to answer from")
    args = parser.parse_args()
    with KVStore() as kv:
        if args.ingest:
            kv.ingest_files(args.ingest)
        records = {record.id: record for record in kv.store.list()}
        ranked = bm25_rank(args.question, {cid: document_text(kv, r) for cid, r in records.items()})
        for cid, score in ranked[: args.top]:
            record = records[cid]
            answer = kv.ask(cid, args.question)
            print(f"[{record.source or cid[:12]} part {record.part + 1}/{record.parts}, bm25 {score:.2f}]")
            print(f"  {answer}\n")


if __name__ == "__main__":
    main()
