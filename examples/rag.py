"""RAG over stored contexts: retrieve the relevant ones, compose their compressed caches, answer once.

    python examples/rag.py "What color is the lighthouse door?" --ingest examples/docs

Nothing is prefilled at question time: the answer decodes against the retrieved contexts' stored,
compressed KV caches, composed into one prompt.
"""

from __future__ import annotations

import argparse

from kvstore import KVStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--ingest", nargs="*", default=[], help="files or folders to ingest first")
    parser.add_argument("--top", type=int, default=3, help="how many contexts to retrieve")
    args = parser.parse_args()
    with KVStore() as kv:
        if args.ingest:
            kv.ingest_files(args.ingest)
        hits = kv.search(args.question, k=args.top)  # BM25 over the stored texts: no blob read
        answer = kv.retrieve_and_ask(args.question, k=args.top)  # those that fit, composed: one answer
        print(answer)
        for hit in hits:
            used = "used" if hit.id in answer.contexts else "did not fit"
            print(f"  [{hit.source or hit.id[:12]} part {hit.part + 1}/{hit.parts}, bm25 {hit.score:.2f}, {used}]")


if __name__ == "__main__":
    main()
