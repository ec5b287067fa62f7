"""Eval results -> summary rows, JSON/CSV files and accuracy-vs-ratio plots per task family."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import import_extra
from kvstore.eval.runner import FULL, CaseResult


@dataclass(frozen=True)
class SummaryRow:
    group: str  # a task name or a family
    method: str
    ratio: float
    accuracy: float
    cases: int
    achieved_ratio: float
    bytes_per_token: float
    score_over_prefill: float  # scoring time / prefill time (0 for the full cache)


def summarize(results: Sequence[CaseResult], by: str = "task") -> list[SummaryRow]:
    """Mean score per (task or family, method, ratio), sorted for reading."""
    groups: dict[tuple[str, str, float], list[CaseResult]] = defaultdict(list)
    for r in results:
        groups[(getattr(r, by), r.method, r.ratio)].append(r)
    rows = []
    for (group, method, ratio), cases in groups.items():
        n = len(cases)
        prefill = sum(c.prefill_s for c in cases)
        rows.append(
            SummaryRow(
                group,
                method,
                ratio,
                sum(c.score for c in cases) / n,
                n,
                sum(c.achieved_ratio for c in cases) / n,
                sum(c.stored_bytes for c in cases) / sum(c.context_tokens for c in cases),
                sum(c.score_s for c in cases) / prefill if prefill else 0.0,
            )
        )
    return sorted(rows, key=lambda row: (row.group, row.method != FULL, row.method, row.ratio))


def write_results(results: Sequence[CaseResult], out_dir: Path) -> list[Path]:
    """results.json (every case) and summary.csv (per task and per family)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = out_dir / "results.json"
    cases.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    summary = out_dir / "summary.csv"
    with summary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["level", *SummaryRow.__dataclass_fields__])
        for level in ("task", "family"):
            for row in summarize(results, by=level):
                writer.writerow([level, *row.__dict__.values()])
    return [cases, summary]


def plot_accuracy(results: Sequence[CaseResult], out_dir: Path) -> list[Path]:
    """One PNG per task family: accuracy vs ratio for each press, the full cache as a dashed line."""
    matplotlib = import_extra("matplotlib", "eval")

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    rows = summarize(results, by="family")
    for family in sorted({row.group for row in rows}):
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        family_rows = [row for row in rows if row.group == family]
        for method in sorted({row.method for row in family_rows} - {FULL}):
            points = sorted((row.ratio, row.accuracy) for row in family_rows if row.method == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        for row in family_rows:
            if row.method == FULL:
                ax.axhline(row.accuracy, linestyle="--", color="gray", label="full cache")
        ax.set(
            xlabel="compression ratio (fraction of KV pairs removed)",
            ylabel="accuracy",
            ylim=(-0.05, 1.05),
            title=f"{family} tasks",
        )
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
        fig.tight_layout()
        path = out_dir / f"accuracy_{family}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
