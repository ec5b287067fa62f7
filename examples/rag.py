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
        answer = kv.retrieve_and_ask(args.question, k=args.top)  # BM25 search, compose what fits, one answer
        print(answer)
        for source in answer.sources:  # the contexts used, in prompt order
            print(
                f"  [{source.source or source.id[:12]} part {source.part + 1}/{source.parts}, bm25 {source.score:.2f}]"
            )


if __name__ == "__main__":
    main()
