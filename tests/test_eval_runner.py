"""The eval pipeline end to end: compress -> store -> load -> ask, summaries, files, plots, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from kvstore.eval.report import plot_accuracy, summarize, write_results
from kvstore.eval.runner import FULL, evaluate
from kvstore.eval.tasks import make_suite
from kvstore.storage.store import ContextStore
from tests.tiny import tiny_model


def test_tiny_eval_stores_every_context_and_reports(store_home: Path, tmp_path: Path) -> None:
    loaded = tiny_model("llama")
    samples = make_suite(["niah_single", "common_words"], n=2, context_tokens=120, seed=1)
    with ContextStore.open() as store:
        results = evaluate(loaded, samples, ["kvzip", "streaming"], [0.5, 0.8], store, max_new_tokens=4)
        stored = store.list()
    assert len(results) == len(samples) * 5  # full + 2 presses x 2 ratios
    assert len(stored) == len(samples) * 5  # every case went through the store (distinct content ids)
    assert {r.method for r in results} == {FULL, "kvzip", "streaming"}
    for r in results:
        assert 0.0 <= r.score <= 1.0
        assert r.achieved_ratio == 0.0 if r.method == FULL else r.achieved_ratio > 0.3
        assert r.score_s == 0.0 if r.method == FULL else r.score_s > 0.0
    rows = summarize(results, by="family")
    assert {(row.group, row.method, row.ratio) for row in rows} >= {
        ("retrieval", FULL, 0.0),
        ("aggregation", "kvzip", 0.8),
    }
    assert all(row.cases == 2 for row in rows)
    files = write_results(results, tmp_path) + plot_accuracy(results, tmp_path)
    assert [f.name for f in files] == [
        "results.json",
        "summary.csv",
        "accuracy_aggregation.png",
        "accuracy_retrieval.png",
    ]
    assert len(json.loads(files[0].read_text())) == len(results)
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    halves = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]  # a sweep split over two processes
    for half, part in zip(halves, (results[:7], results[7:]), strict=True):
        half.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in part))
    merged = CliRunner().invoke(main, ["report", *map(str, halves), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "merged" / "results.json").read_text()) == json.loads(files[0].read_text())


def test_multi_document_samples_are_also_answered_composed_blended_and_from_one_document(store_home: Path) -> None:
    loaded = tiny_model("qwen3")
    samples = make_suite(["multidoc_needle", "long_document"], n=1, context_tokens=320, seed=2)
    with ContextStore.open() as store:
        results = evaluate(loaded, samples, ["kvzip"], [0.5], store, max_new_tokens=4, blend_fraction=0.2)
    methods = {r.method for r in results}
    assert methods == {FULL, "full composed", "full blended", "full single", "kvzip", "kvzip composed",
                       "kvzip blended", "kvzip single"}  # fmt: skip
    for sample in samples:
        mine = {r.method: r for r in results if r.sample_id == sample.id}
        joint, composed, single = mine["kvzip"], mine["kvzip composed"], mine["kvzip single"]
        # The composition holds one template head, the joint prefill the same documents: lengths agree
        # within the separators and part cuts; one document alone is about a quarter of it.
        assert abs(composed.context_tokens - joint.context_tokens) <= 16
        assert single.context_tokens < composed.context_tokens / 2
        assert mine["full composed"].achieved_ratio == 0.0 and 0.3 < composed.achieved_ratio < 0.6
        assert composed.stored_bytes > single.stored_bytes and composed.score_s > 0


@pytest.mark.model
def test_eval_and_bench_commands_write_their_files(store_home: Path, tmp_path: Path) -> None:
    evaluated = CliRunner().invoke(
        main,
        [
            "eval",
            "--tasks",
            "niah_single",
            "--n",
            "1",
            "--context-tokens",
            "200",
            "--ratio",
            "0.5",
            "--press",
            "kvzip",
            "--max-new-tokens",
            "16",
            "--out",
            str(tmp_path / "eval"),
        ],
        catch_exceptions=False,
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {
        "results.json",
        "results.jsonl",
        "summary.csv",
        "accuracy_retrieval.png",
    }
    assert "niah_single" in evaluated.output and "kvzip" in evaluated.output
    benched = CliRunner().invoke(
        main,
        ["bench", "--lengths", "150", "--questions", "1,2", "--out", str(tmp_path / "bench")],
        catch_exceptions=False,
    )
    assert benched.exit_code == 0, benched.output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    [row] = report["lengths"]
    assert row["kv_bytes_compressed"] < 0.5 * row["kv_bytes_full"] and row["blob_bytes"] < row["full_kv_bytes"]
    assert [t["questions"] for t in report["ask_many"]] == [1, 2]


def test_chain_cases_report_their_scoring_time(store_home: Path) -> None:
    loaded = tiny_model("llama")
    samples = make_suite(["niah_single"], n=1, context_tokens=120, seed=1)
    with ContextStore.open() as store:
        results = evaluate(loaded, samples, ["kvzip+think:0.25"], [0.5, 0.8], store, max_new_tokens=2)
    chained = [r for r in results if r.method != FULL]
    assert len(chained) == 2 and all(r.score_s > 0.0 for r in chained)  # scored inside each cut
