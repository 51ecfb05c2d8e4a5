"""Benchmark runner: datasets, method variants, the run itself and its output files."""
from __future__ import annotations

import csv
import json

import pytest

from ragdemo.bench.datasets import (NEEDLE, Dataset, Haystack, Question, load_dataset, load_jsonl, load_squad,
                                    needle_haystack)
from ragdemo.bench.runner import apply_limits, parse_method_specs, run_bench, write_outputs
from ragdemo.errors import UserError


def test_squad_sample_has_whole_articles_and_enough_questions():
    data = load_squad()
    (haystack,) = data.haystacks
    assert len(haystack.documents) >= 5 and len(haystack.questions) >= 200
    sampled = load_squad(n=20, seed=3)
    assert [q.id for q in sampled.haystacks[0].questions] == [q.id for q in load_squad(n=20, seed=3).haystacks[0].questions]
    assert [q.id for q in sampled.haystacks[0].questions] != [q.id for q in load_squad(n=20, seed=4).haystacks[0].questions]
    # the collection holds every paragraph of the articles, not just the ones asked about
    assert len(sampled.haystacks[0].documents) == len(haystack.documents)
    first_doc = haystack.documents[0][1]
    assert all(q.meta["doc"] in {name for name, _ in haystack.documents} for q in haystack.questions)
    assert first_doc.count("\n\n") >= 10


def test_squad_articles_limit_keeps_questions_inside_those_articles():
    data = load_squad(n=30, seed=1, articles=2)
    names = {name for name, _ in data.haystacks[0].documents}
    assert len(names) == 2
    assert {q.meta["doc"] for q in data.haystacks[0].questions} <= names


def test_jsonl_groups_contexts_by_doc(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": "Who?", "answers": ["Ann"], "context": "Ann wrote it.", "doc": "a"},
            {"question": "What?", "answers": [{"text": "a book"}], "context": "It is a book.", "doc": "a"},
            {"question": "Where?", "answers": "Paris", "context": "In Paris."},
            {"question": "Again?", "answers": ["Ann"], "context": "Ann wrote it.", "doc": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_jsonl(path)
    docs = dict(data.haystacks[0].documents)
    assert docs["a.txt"] == "Ann wrote it.\n\nIt is a book."
    assert docs["context2.txt"] == "In Paris."
    assert [q.answers for q in data.haystacks[0].questions] == [["Ann"], ["a book"], ["Paris"], ["Ann"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answers"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_jsonl(bad)


def test_needle_is_placed_at_depth_within_the_length(tiny_lm):
    tok = tiny_lm.tokenizer
    data = load_dataset("needle", tok, lengths=[256, 512], depths=[0, 50, 100])
    assert len(data.haystacks) == 6
    for hay in data.haystacks:
        (name, text), = hay.documents
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert abs(n - hay.meta["length"]) <= 8, (hay.key, n)
        position = text.index(NEEDLE) / len(text)
        assert abs(position - hay.meta["depth"] / 100) < 0.15, (hay.key, position)
    assert needle_haystack(tok, "One. Two. Three. " * 100, 64, 0).startswith(NEEDLE)
    assert needle_haystack(tok, "One. Two. Three. " * 100, 64, 100).endswith(NEEDLE)


def test_method_variants_and_knobs():
    specs = parse_method_specs("closed_book,rag@k=2,rag@k=7", {"rag": {"k": "3", "max_new_tokens": "5"}})
    assert [s.label for s in specs] == ["closed_book", "rag@k=2", "rag@k=7"]
    assert specs[1].params(24).k == 2 and specs[2].params(24).k == 7 and specs[1].params(24).max_new_tokens == 5
    with pytest.raises(UserError, match="unknown knob"):
        parse_method_specs("rag@kk=2")
    with pytest.raises(UserError, match="unknown method"):
        parse_method_specs("nope")
    with pytest.raises(UserError, match="twice"):
        parse_method_specs("rag,rag")
    apply_limits(specs, {"rag@k=7": 1})
    assert specs[2].limit == 1 and specs[1].limit is None


def _tiny_dataset() -> Dataset:
    docs = [("eiffel.txt", "The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair. " * 4),
            ("bananas.txt", "Bananas are yellow fruits rich in potassium. " * 8)]
    questions = [Question("q1", "When was the Eiffel Tower completed?", ["1889", "in 1889"]),
                 Question("q2", "What color are bananas?", ["yellow"]),
                 Question("q3", "Where is the Eiffel Tower?", ["Paris"])]
    return Dataset("tiny", [Haystack("t", docs, questions)], "tiny test set")


def test_run_on_tiny_model_writes_every_output(tiny_bench, tmp_path):
    specs = parse_method_specs("full_context,rag@k=1")
    apply_limits(specs, {"full_context": 2})
    seen = []
    run = run_bench(tiny_bench, _tiny_dataset(), specs, reference="rag", max_new_tokens=4,
                    progress=lambda f, m: seen.append(f))
    labels = [s.label for s in run.specs]
    assert labels == ["closed_book", "full_context", "rag@k=1", "rag"]  # closed book and the reference added
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert len(run.records) == 3
    for record in run.records:
        closed = record["results"]["closed_book"]
        assert not closed["answered"] and closed["nll"] > 0  # NLL only, since it was not asked for
        rag = record["results"]["rag@k=1"]
        assert rag["answered"] and rag["prompt_tokens"] > 0 and rag["ttft_s"] > 0 and rag["nll"] > 0
        assert set(rag) >= {"em", "f1", "contains", "total_s", "bytes_per_token"}
    assert "full_context" not in run.records[2]["results"]  # limited to 2 questions
    by_label = {row["method"]: row for row in run.summary}
    assert by_label["full_context"]["n"] == 2 and by_label["rag@k=1"]["n"] == 3
    assert by_label["rag"]["ttft_vs_ref"] == pytest.approx(1.0)
    assert by_label["rag"]["indicative"]  # 3 questions
    files = write_outputs(run, tmp_path / "out")
    names = {p.name for p in files}
    assert {"results.json", "summary.csv", "summary.md", "quality_vs_ttft.png", "storage.png"} <= names
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [r["method"] for r in rows] == labels
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "reference for context value kept and TTFT ratio: **rag**" in md and "ratio of summed gaps" in md
    assert f"- attention: {tiny_bench.models.lm.attention}\n" in md  # which kernel the numbers ran on
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["meta"]["reference"] == "rag" and len(saved["questions"]) == 3
    # the collection is dropped afterwards; the user's store keeps no benchmark data
    assert not [c for c in tiny_bench.store.collections() if c["name"].startswith("bench-")]
    assert tiny_bench.store.value("SELECT COUNT(*) FROM chunks") == 0


def test_cli_bench_on_a_jsonl_file(tiny_settings, tmp_path, monkeypatch, capsys):
    from ragdemo.cli import main

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Where is the tower?", "answers": ["Paris"],
                                "context": "The tower is in Paris."}) + "\n")
    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAGDEMO_MODEL", tiny_settings.model_id)
    code = main(["bench", "--dataset", str(path), "--methods", "closed_book,rag", "--dtype", "fp32",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "o"), "--no-plots"])
    assert code == 0
    assert (tmp_path / "o" / "summary.csv").exists()
    assert "| rag (indicative: < 20 questions) |" in capsys.readouterr().out
    assert main(["bench", "--dataset", "nope.txt", "--out", str(tmp_path / "o2")]) == 2


def test_time_budget_makes_a_partial_run_that_says_so(tiny_bench, tmp_path):
    run = run_bench(tiny_bench, _tiny_dataset(), parse_method_specs("rag"), max_new_tokens=2, time_budget_s=0.0)
    assert run.records == [] and run.meta["partial"].startswith("partial: stopped after 0 of 3 questions")
    write_outputs(run, tmp_path / "p", plots=False)
    assert "**partial: stopped after 0 of 3" in (tmp_path / "p" / "summary.md").read_text()


def _synthetic_run(n_questions: int, limited_to: int):
    """A run with known NLLs and TTFTs: the reference (rag) is 2x slower on the first questions, which only
    the limited method answers."""
    from ragdemo.bench.runner import BenchRun, MethodSpec, summarize

    specs = [MethodSpec("closed_book", "closed_book", answers=False), MethodSpec("slow", "rag"),
             MethodSpec("rag", "rag")]
    records = []
    for i in range(n_questions):
        ref_ttft = 2.0 if i < limited_to else 0.5
        results = {"closed_book": {"answered": False, "nll": 4.0},
                   "rag": {"answered": True, "ttft_s": ref_ttft, "nll": 2.0}}
        if i < limited_to:
            results["slow"] = {"answered": True, "ttft_s": 1.0, "nll": 3.0}
        records.append({"id": f"q{i}", "results": results, "meta": {}})
    run = BenchRun({"reference": "rag"}, specs, records, {}, {})
    return {row["method"]: row for row in summarize(run)}


def test_summary_ratios_use_the_same_questions_and_flag_small_runs():
    rows = _synthetic_run(n_questions=30, limited_to=3)
    # slow answered 3 questions where rag took 2.0 s: 0.5x, not 1.0 / mean(all rag TTFTs) = 1.54x
    assert rows["slow"]["ttft_vs_ref"] == pytest.approx(0.5)
    assert rows["rag"]["ttft_vs_ref"] == pytest.approx(1.0)
    # the reference against itself is exactly 1, and defined, when it beats closed book
    assert rows["rag"]["value_kept"] == pytest.approx(1.0) and rows["rag"]["value_kept_median"] == pytest.approx(1.0)
    assert rows["slow"]["value_kept"] == pytest.approx(0.5) and rows["slow"]["value_kept_n"] == 3
    assert rows["slow"]["indicative"] and not rows["rag"]["indicative"]
