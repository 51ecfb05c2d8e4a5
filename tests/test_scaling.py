"""bench-scaling's arithmetic, on hand-made figures: each ceiling from its parts, the share, the sentence said from
the data, the plot; and its command's bad input. (The quick results suite runs the whole bench:
tests/test_results_suite.py.)"""
from __future__ import annotations

import pytest

from ragdemo.bench.scaling import ceiling_s, plot_scaling, scaling_markdown, summary_text, win_sentence
from ragdemo.bench.speed import Row
from ragdemo.cli import main
from ragdemo.methods.base import Result


def _row(method: str, ttft: float, prefill: float, processed: float, overhead: float = 0.0, retrieve: float = 0.01):
    row = Row(method, method, {})
    row.results.append((Result(method, ttft_s=ttft, retrieve_s=retrieve, processed_tokens=processed,
                               overhead_tokens=overhead), prefill, 0.0))
    return row


def test_each_ceiling_is_made_of_the_same_runs_parts():
    rag = _row("rag", ttft=1.0, prefill=0.9, processed=2000)
    # LLoCO: retrieval + the question's prefill alone
    assert ceiling_s(_row("lloco", 0.1, 0.05, 20), rag, retrieve_s=0.01, floor_s=0.04) == pytest.approx(0.05)
    # BTR and CacheBlend: retrieval + RAG's prefill scaled by the token-layers they still run (overhead included)
    assert ceiling_s(_row("btr", 0.5, 0.4, 800), rag, 0.01, 0.04) == pytest.approx(0.01 + 0.9 * 800 / 2000)
    assert ceiling_s(_row("cacheblend", 0.5, 0.4, 450, overhead=50), rag, 0.01, 0.04) == pytest.approx(0.01 + 0.9 * 0.25)
    assert ceiling_s(rag, rag, 0.01, 0.04) is None


def _record() -> dict:
    """Two ladders; LLoCO slower than RAG at the smallest size, 5x and more from 800 prompt tokens on."""
    def method(label, speedup, share=None, value=0.95):
        entry = {"label": label, "method": label, "knobs": {}, "speedup": speedup, "processed_tokens": 10.0,
                 "cached_tokens": 90.0, "prompt_tokens": 100.0, "bytes_read": 1000,
                 "ms": {"ttft": 100 / speedup, "retrieve": 1, "load": 1, "prefill": 50, "first": 0.1, "overhead": 1},
                 "value_kept": {"value": value, "low": value - 0.05, "high": value + 0.05}}
        if share is not None:
            entry["ceiling"] = {"ms": 100 / speedup * share, "speedup": speedup / share, "share": share}
        return entry

    sizes = [("retrieved", 2, 200, 0.8), ("retrieved", 10, 800, 5.5), ("document", 1024, 1100, 7.0),
             ("document", 2048, 2200, 12.0)]
    rungs = [{"ladder": ladder, "size": size, "k": size, "chunks": size, "name": f"{ladder} {size}",
              "description": f"{ladder} ladder", "n_questions": 3, "context_tokens": tokens, "retrieve_ms": 1,
              "question_alone_ms": 10, "question_tokens": 20, "rag_prefill_ms": 50, "prepare_s": 1,
              "methods": [method("rag", 1.0, value=1.0), method("lloco", speed, share=0.8)]}
             for ladder, size, tokens, speed in sizes]
    return {"methods": ["rag", "lloco"], "reference": "rag", "rungs": rungs, "model": "m", "dtype": "float32",
            "ceilings": {"lloco": "the question alone"}, "load_start": [0.5], "load_end": [0.6], "wall_s": 60}


def test_the_sentence_is_read_from_the_data():
    sentence = win_sentence(_record(), "lloco")
    assert sentence.startswith("`lloco`: at best 12.0x faster than RAG at 2,200 prompt tokens (document 2048)")
    assert "keeping 95% [90, 100] of RAG's value" in sentence
    assert "at least 5x faster than RAG from about 800 prompt tokens on, 10x from about 2,200;" in sentence
    assert "slower than RAG at 200 prompt tokens" in sentence and "80% to 80% of its ceiling" in sentence


def test_the_table_summary_and_plot_show_every_size(tmp_path):
    record = _record()
    table = scaling_markdown(record)
    assert table.count("| `lloco` |") == 4 and "1.2x slower" in table and "(80%)" in table
    text = summary_text(record)
    assert "lloco: the question alone" in text and "5.5x faster, 80% of ceiling" in text
    assert "lloco: >= 85% of its ceiling at every size: not met (lowest 80%" in text and "k=32 not in this run" in text
    record["rungs"][1]["k"] = 32  # the speed target is stated at k=32: 15x for LLoCO
    assert ("lloco: at k=32 (800 prompt tokens) >= 15x faster than RAG: not met: 5.5x faster than RAG, value kept "
            "95% [90, 100]; its ceiling is 6.9x faster than RAG") in summary_text(record)
    assert plot_scaling(record, tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["bench-scaling", "--ks", "2,x"], "--ks takes comma-separated whole numbers"),
    (["bench-scaling", "--documents", "0"], "--documents takes positive numbers"),
    (["bench-scaling", "--facts", "99", "--ks", "", "--documents", "100"], "--facts is between 1 and 12"),
    (["bench-scaling", "--methods", "lloco"], "put it in --methods"),
])
def test_bad_input_is_one_line(argv, message, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "home"))
    assert main(argv + ["--model", tiny_model_dir, "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]
