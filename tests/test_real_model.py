"""Accuracy on the real default model: compressed contexts still find the needle."""

from __future__ import annotations

import pytest

from kvstore.eval.haystack import tokenizer_counter
from kvstore.eval.runner import evaluate
from kvstore.eval.tasks import make_niah
from kvstore.storage.store import ContextStore

pytestmark = pytest.mark.model


def test_niah_1000_tokens_at_ratio_075_answers_4_of_5(real_model, store_home) -> None:
    samples = make_niah(5, 1000, seed=7, count_tokens=tokenizer_counter(real_model.tokenizer))
    with ContextStore.open() as store:
        results = evaluate(real_model, samples, ["kvzip"], [0.75], store, max_new_tokens=24)
    kvzip = [r for r in results if r.method == "kvzip"]
    assert len(kvzip) == 5 and all(abs(r.achieved_ratio - 0.75) < 0.03 for r in kvzip)
    correct = sum(r.score == 1.0 for r in kvzip)
    assert correct >= 4, [(r.expected, r.answer) for r in kvzip]
