"""Benchmark runs with the real default model (SmolLM2-135M): slow, run with `-m slow`."""
from __future__ import annotations

import pytest

from ragdemo.bench.datasets import load_needle, load_squad
from ragdemo.bench.runner import parse_method_specs, run_bench

pytestmark = pytest.mark.slow


@pytest.fixture
def real_bench(default_settings):
    from ragdemo.workbench import Workbench

    return Workbench(default_settings)


def test_squad_runner_with_the_default_model(real_bench):
    data = load_squad(n=6, seed=0, articles=1)
    run = run_bench(real_bench, data, parse_method_specs("closed_book,rag"), reference="rag", max_new_tokens=16)
    rows = {r["method"]: r for r in run.summary}
    assert rows["rag"]["errors"] == 0 and rows["rag"]["n"] == 6
    assert rows["rag"]["prompt_tokens"] > 5 * rows["closed_book"]["prompt_tokens"]
    # retrieved passages from the right article make the gold answer more likely than the question alone
    assert rows["rag"]["nll"] < rows["closed_book"]["nll"]
    assert rows["rag"]["value_kept"] == pytest.approx(1.0)
    assert all(r["results"]["rag"]["answer"].strip() for r in run.records)


def test_full_context_finds_the_needle_at_short_length(real_bench):
    """The model is tiny: it seldom repeats the needle word for word, so we score the needle's keywords
    ("sandwich", "Dolores Park") in its answer. Closed book cannot know them."""
    data = load_needle(real_bench.models.lm.tokenizer, lengths=[1024], depths=[50])
    run = run_bench(real_bench, data, parse_method_specs("closed_book,full_context"), reference="full_context",
                    max_new_tokens=32)
    (record,) = run.records
    full, closed = record["results"]["full_context"], record["results"]["closed_book"]
    assert full["answered"], full.get("error")
    assert full["keywords"] >= 0.5, full["answer"]
    assert closed["keywords"] == 0.0, closed["answer"]
    assert full["nll"] < closed["nll"] - 1.0
