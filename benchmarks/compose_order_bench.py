"""Does it matter where the answering document sits in a composition? Accuracy by the target's slot.

    PYTHONPATH=. python benchmarks/compose_order_bench.py --n 20 --seed 1 --haystack ../shared/data/haystack

Multi-document needle cases (4 documents, one needle each, the question asks one key): each
document is compressed once (KVzip at each --ratios; 0 = the full cache), then the same four
stored documents are composed four times, the target document moved to slot 0, 1, 2 and 3 (the
others keep their order), and the question is answered from each composition. With --joint, the
same four orders are also prefilled jointly (full cache, no store): whether the model itself
favours the last document, or only the composition does. Seed 1 by default:
other cases than the `kvstore eval` tables (seed 0), so an ordering rule chosen from these figures
is not judged on the cases that chose it.
"""

from __future__ import annotations

import argparse

from kvstore.compress import compress
from kvstore.decode.cache import CompressedCache
from kvstore.decode.compose import compose
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.models import LoadedModel, load_model
from kvstore.eval.haystack import tokenizer_counter
from kvstore.eval.tasks import DOCUMENTS, Sample, make_sample
from kvstore.kv.compressed import CompressedKV
from kvstore.presses import parse_press_spec


def answered(loaded: LoadedModel, sample: Sample, parts: list[CompressedKV], options: GenerationOptions) -> bool:
    """Whether the composition of `parts` answers the sample's question right."""
    cache = CompressedCache.for_model(compose(loaded, parts), loaded)
    return sample.score(answer_many(loaded, cache, [sample.question], options)[0]) == 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ratios", default="0,0.75")
    parser.add_argument("--context-tokens", type=int, default=2800, help="all four documents together")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--haystack", default=None)
    parser.add_argument("--joint", action="store_true", help="also answer from a joint prefill of each order")
    args = parser.parse_args()
    loaded = load_model()
    count = tokenizer_counter(loaded.tokenizer)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    ratios = [float(r) for r in args.ratios.split(",")]
    rows: list[float | str] = [*ratios, "joint"] if args.joint else list(ratios)
    correct = {(row, slot): 0 for row in rows for slot in range(DOCUMENTS)}
    full = parse_press_spec("none", 0.0)
    for index in range(args.n):
        sample = make_sample(
            "multidoc_needle", index, args.n, args.context_tokens, args.seed, args.haystack, count_tokens=count
        )
        target = sample.meta["target_document"]
        others = [d for i, d in enumerate(sample.documents) if i != target]
        orders = [[*others[:slot], sample.documents[target], *others[slot:]] for slot in range(DOCUMENTS)]
        for row in rows:
            if row == "joint":  # each order prefilled as one text: what the model does with all of it
                compositions = [[compress(loaded, "\n\n".join(order), full)] for order in orders]
            else:
                press = full if row == 0 else parse_press_spec("kvzip", row)
                stored = {d: compress(loaded, d, press) for d in sample.documents}
                compositions = [[stored[d] for d in order] for order in orders]
            marks = ""
            for slot, parts in enumerate(compositions):
                hit = answered(loaded, sample, parts, options)
                correct[(row, slot)] += hit
                marks += "x" if hit else "."
            print(f"case {index:2d} {row}: target at slot 0..3: {marks}", flush=True)
    print("\n| removed | target in slot 1 (first) | slot 2 | slot 3 | slot 4 (last, next to the question) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        cells = " | ".join(f"{correct[(row, slot)] / args.n:.2f}" for slot in range(DOCUMENTS))
        label = "joint prefill, full cache" if row == "joint" else "full cache" if row == 0 else f"{row:.0%}"
        print(f"| {label} | {cells} |")


if __name__ == "__main__":
    main()
