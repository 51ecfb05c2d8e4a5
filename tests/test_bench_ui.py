"""The Benchmark tab: it builds inside a Blocks and its handler runs the same runner as the CLI."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from ragdemo.ui.bench_tab import build_bench_tab, methods_from, run_from_ui


def test_tab_builds_inside_blocks(tiny_bench):
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_bench_tab(tiny_bench)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"bench-dataset", "bench-methods", "bench-run", "bench-summary"} <= ids


def test_methods_from_checkboxes_and_variants():
    assert methods_from(["rag"], "rag@k=2, closed_book") == ["rag", "rag@k=2", "closed_book"]
    with pytest.raises(Exception, match="at least one method"):
        methods_from([], " ")


def test_handler_runs_a_jsonl_benchmark(tiny_bench, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Where is the tower?", "answers": ["Paris"],
                                "context": "The tower is in Paris."}) + "\n")
    header, table, pareto, storage, needle, files = run_from_ui(
        tiny_bench, "jsonl", str(path), 1, 0, ["closed_book", "rag"], "rag@k=1", "rag", "", "", 3, progress=None)
    assert "reference **rag**" in header
    assert list(table["method"]) == ["closed_book", "rag", "rag@k=1"]
    assert pareto and pareto.endswith("quality_vs_ttft.png") and needle is None
    assert any(f.endswith("results.json") for f in files)
    with pytest.raises(gr.Error, match="upload a .jsonl"):
        run_from_ui(tiny_bench, "jsonl", None, 1, 0, ["rag"], "", "rag", "", "", 3, progress=None)
