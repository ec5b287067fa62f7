"""The prepared GPU script runs end to end at a small size on CPU, with every figure it reports."""

from __future__ import annotations

import json
import math

from benchmarks.gpu_run import main


def test_gpu_run_small_reports_every_stage_and_kernel(tmp_path) -> None:
    out = tmp_path / "gpu_run.json"
    report = main(["--small", "--lengths", "300", "--batches", "1,2", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text())["lengths"][0]["tokens"] == 300
    [row] = report["lengths"]
    assert row["prefill_s"] > 0 and row["score_s"] > 0 and math.isfinite(row["score_over_prefill"])
    assert 0.2 < row["kept_fraction"] < 0.35  # KVzip at 0.75 removed, the template head always kept
    decode = row["decode"]
    for kernel in ("loop", "fused"):
        for batch in (1, 2):
            full, compressed = decode[f"{kernel} full batch {batch}"], decode[f"{kernel} compressed batch {batch}"]
            assert full["ms_per_step"] > 0 and compressed["ms_per_step"] > 0
            assert compressed["cache_mib"] < full["cache_mib"] / 2  # memory in use is what was kept
    assert set(row["fused_backend_ms"]["batch 2"]) == {"heads", "flex"}
    assert all(isinstance(ms, float) for ms in row["fused_backend_ms"]["batch 1"].values())
    assert row["backend_chosen"] == "heads"
