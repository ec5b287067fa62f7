"""Budget benchmark: NIAH accuracy of KVzip's scores cut by different budgets, over several seeds.

Why: budgets differ only in which pairs a fixed number of kept slots go to, so the fair comparison
scores each case once and cuts those same scores with every budget. Twenty cases per seed is too
few to tell budgets apart, so this runs seeds side by side and prints one markdown row per seed
plus the total (the full cache is measured on every case as the reference).

    python benchmarks/budget_bench.py [--seeds 0,1,2] [--n 20] [--tokens 1500] [--ratios 0.75,0.9]
        [--budgets global,floored] [--haystack DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvstore.compress import pack
from kvstore.decode.cache import CompressedCache
from kvstore.decode.generation import GenerationOptions, answer_many
from kvstore.engine.models import LoadedModel, load_model
from kvstore.eval.haystack import tokenizer_counter
from kvstore.eval.tasks import Sample, make_niah
from kvstore.presses import KVzipPress
from kvstore.presses.base import prefill_context
from kvstore.presses.budget import select

DEFAULT_HAYSTACK = Path("/work/shared/data/haystack")
FULL = "full"


def _csv(text: str, cast: type) -> list:
    return [cast(part) for part in text.split(",") if part.strip()]


def run_case(
    loaded: LoadedModel, sample: Sample, ratios: list[float], budgets: list[str], max_new_tokens: int
) -> dict[tuple[str, float], float]:
    """{(FULL, 0.0) or (budget, ratio): score} for one case, from one prefill and one scoring pass."""
    run = prefill_context(loaded, sample.context)
    scores = KVzipPress(compression_ratio=max(ratios)).score(run)

    def ask(masks: list[torch.Tensor]) -> float:
        cache = CompressedCache(pack(run, masks), device=loaded.device)
        return sample.score(
            answer_many(loaded, cache, [sample.question], GenerationOptions(max_new_tokens=max_new_tokens))[0]
        )

    outcome = {(FULL, 0.0): ask(run.keep_all())}
    for ratio in ratios:
        for budget in budgets:
            outcome[(budget, ratio)] = ask(select(scores, ratio, budget))
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--ratios", default="0.75,0.9")
    parser.add_argument("--budgets", default="global,floored")
    parser.add_argument("--haystack", type=Path, default=DEFAULT_HAYSTACK if DEFAULT_HAYSTACK.is_dir() else None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    seeds, ratios, budgets = _csv(args.seeds, int), _csv(args.ratios, float), _csv(args.budgets, str)

    loaded = load_model("smollm2-135m")
    columns = [(FULL, 0.0)] + [(b, r) for r in ratios for b in budgets]
    print("| seed | " + " | ".join(FULL if b == FULL else f"{b} {r:g}" for b, r in columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    totals = dict.fromkeys(columns, 0.0)
    for seed in seeds:
        samples = make_niah(args.n, args.tokens, seed, args.haystack, tokenizer_counter(loaded.tokenizer))
        sums = dict.fromkeys(columns, 0.0)
        for sample in samples:
            for key, score in run_case(loaded, sample, ratios, budgets, args.max_new_tokens).items():
                sums[key] += score
        for key in columns:
            totals[key] += sums[key]
        print(f"| {seed} | " + " | ".join(f"{sums[key] / args.n:.2f}" for key in columns) + " |", flush=True)
    cases = args.n * len(seeds)
    print("| all | " + " | ".join(f"{totals[key] / cases:.3f}" for key in columns) + " |")


if __name__ == "__main__":
    main()
