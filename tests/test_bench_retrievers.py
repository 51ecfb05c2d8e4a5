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


# every measured table a card renders from a result file, and the README quotes: (module, file attr, rows attr)
QUOTED_TABLES = [("cacheblend", "RESULTS", "MEASURED_ROWS"), ("lingua", "RESULTS", "MEASURED_ROWS"),
                 ("lingua", "HELDOUT", "HELDOUT_ROWS"), ("lloco", "RESULTS", "MEASURED_ROWS")]


@pytest.mark.parametrize("module_name, results, rows", QUOTED_TABLES)
def test_readme_and_cards_quote_the_measured_tables(module_name, results, rows):
    """The README's tables are the result files' rows, rendered by the same function the cards use (no
    hand-copied figures), and the committed result file has every row the card asks for."""
    import importlib

    from ragdemo.methods import get_method
    from ragdemo.methods.measured import measured_table

    module = importlib.import_module(f"ragdemo.methods.{module_name}")
    names = getattr(module, rows)
    table = measured_table(getattr(module, results), names)
    assert table.startswith("| method") and table.count("\n| ") == len(names), table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme and table in type(get_method(module_name)).card


@pytest.mark.parametrize("name", ["issue15_squad/summary.md", "issue15_needle/summary.md"])
def test_readme_quotes_the_whole_beyond_the_papers_runs(name):
    """The README's whole-run tables are the bundled files' tables, not hand-copied figures."""
    from ragdemo.methods.measured import measured_run

    run = measured_run(name)
    assert run is not None and len(run.rows) >= 5
    assert run.table(list(run.rows)) in (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_quotes_the_retriever_comparison():
    root = Path(__file__).resolve().parents[1]
    assert (root / "assets/results/retrievers/retrievers_summary.md").read_text().strip() in (root / "README.md").read_text()
