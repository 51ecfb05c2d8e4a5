"""bench-retrievers: binary against float retriever on SQuAD questions (recall, gold-paragraph hits, bytes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragdemo.bench.datasets import load_squad
from ragdemo.bench.retrievers import gold_hit_rate, in_paragraph

from .test_bench_order_storage import _env


def test_a_chunk_belongs_to_the_paragraph_it_shares_a_long_piece_with():
    paragraph = "The Amazon rainforest covers much of the basin. It spans nine nations."
    assert in_paragraph("The Amazon rainforest covers much of the basin.", paragraph)
    # a chunk straddling a paragraph break belongs to both paragraphs
    assert in_paragraph("Another paragraph ends here.\n\nIt spans nine nations.", paragraph)
    assert not in_paragraph("Another paragraph ends here entirely.", paragraph)
    assert not in_paragraph("nine nations", paragraph)  # too short to place the chunk


def test_gold_hit_rate_counts_questions_with_a_gold_chunk_in_their_top_k():
    texts = {1: "alpha beta gamma delta epsilon", 2: "zeta eta theta iota kappa lambda", 3: "mu nu xi omicron pi rho"}
    paragraphs = ["intro. alpha beta gamma delta epsilon. outro", "mu nu xi omicron pi rho sigma"]
    assert gold_hit_rate([[1, 2], [2]], paragraphs, texts) == 0.5
    assert gold_hit_rate([[2, 1], [3]], paragraphs, texts) == 1.0


def test_squad_questions_carry_their_gold_paragraph():
    (haystack,) = load_squad(n=5, articles=1).haystacks
    document = haystack.documents[0][1]
    for q in haystack.questions:
        assert q.meta["paragraph"] and q.meta["paragraph"] in document
        assert any(a in q.meta["paragraph"] for a in q.answers)


def test_bench_retrievers_writes_recall_hits_and_bytes(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ragdemo", "bench-retrievers", "--articles", "1", "--n", "10",
                           "--rescore", "1000", "--out", str(out)], capture_output=True, text=True,
                          env=_env(tmp_path / "h", tiny_model_dir), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((out / "retrievers.json").read_text())["rows"]
    assert row["questions"] == 10 and row["chunks"] > 5
    # rescoring over more candidates than chunks is the exact float search
    assert row["recall_at_k"] == 1.0 and row["gold_hit_binary"] == row["gold_hit_float"]
    assert row["float32_bytes"] == 32 * row["binary_index_bytes"]
    assert "| squad-1-articles |" in (out / "retrievers_summary.md").read_text()
