"""Multiple-choice scoring in the bench: each method scores every option through its own NLL read path; accuracy
and acc_norm with intervals beside the generative scores; the option order does not matter; with the answer only
in the document, RAG beats closed book."""
from __future__ import annotations

import json
import random

import pytest
import torch

from ragdemo.bench.choices import OptionScores
from ragdemo.bench.datasets import FACTS, load_jsonl
from ragdemo.bench.runner import parse_method_specs, run_bench, summary_markdown
from ragdemo.errors import UserError

FILLER = ("The committee met again in the spring to discuss the budget for the coming year, and the minutes were "
          "read aloud before the vote.")


def fact_rows(shuffle_seed: int | None = None) -> list[dict]:
    """One multiple-choice row per made-up fact, each fact in its own small document; the gold option's place
    moves from row to row, or is shuffled by `shuffle_seed`."""
    rows = []
    for i, fact in enumerate(FACTS):
        options = [fact.answer, *fact.distractors]
        if shuffle_seed is None:
            options = options[-(i % 4):] + options[:-(i % 4)] if i % 4 else options
        else:
            random.Random(shuffle_seed * 100 + i).shuffle(options)
        rows.append({"id": f"fact{i}", "question": fact.question, "options": options,
                     "gold": options.index(fact.answer), "context": f"{fact.sentence} {FILLER}", "doc": f"fact{i}"})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_a_jsonl_row_may_be_multiple_choice(tmp_path):
    rows = [{"question": "Q1?", "options": ["red", "blue", "green"], "gold": 1, "context": "The sky is blue."},
            {"question": "Q2?", "answers": ["open"], "context": "An open question."}]
    data = load_jsonl(write_jsonl(tmp_path / "mc.jsonl", rows))
    first, second = data.haystacks[0].questions
    assert first.options == ["red", "blue", "green"] and first.gold == 1 and first.answers == ["blue"]
    assert second.options == [] and second.gold is None and second.answers == ["open"]
    for bad, message in (({"gold": 3}, "index of the right option"), ({"gold": True}, "index"),
                         ({"options": ["only"]}, "at least 2"), ({"options": ["a", "a"]}, "same text twice"),
                         ({"options": "a,b"}, "list")):
        row = {"question": "Q?", "options": ["a", "b"], "gold": 0, **bad}
        with pytest.raises(UserError, match=message):
            load_jsonl(write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_acc_picks_the_likeliest_option_and_acc_norm_the_likeliest_per_character():
    # option 1 is the likeliest in all (-6 > -8) but option 0 per character (-8/40 = -0.2 > -6/10 = -0.6)
    scores = OptionScores(nll=[2.0, 3.0], loglik=[-8.0, -6.0], chars=[40, 10], gold=0)
    assert scores.choice() == 1 and scores.choice_norm() == 0
    assert scores.to_dict()["acc"] == 0.0 and scores.to_dict()["acc_norm"] == 1.0


METHODS = "rag,lloco,cacheblend,btr@split=2"


def _run(bench, path, methods=METHODS, generate: bool = True, **options):
    """The bench over a JSONL file; without `generate`, the methods only score (no answer is generated)."""
    from ragdemo.bench.datasets import load_dataset

    specs = parse_method_specs(methods)
    for spec in specs:
        spec.answers = generate
    return run_bench(bench, load_dataset(str(path)), specs, max_new_tokens=2, **options)


def test_each_method_scores_every_option_and_the_option_order_does_not_change_accuracy(tiny_bench, tmp_path):
    """The same questions twice in one run, the second time with the options in another order: every method gives
    each option the same log-likelihood and picks the same one, so acc and acc_norm are unchanged."""
    n = 4
    shuffled = [{**row, "id": row["id"] + "-shuffled"} for row in fact_rows(shuffle_seed=1)[:n]]
    run = _run(tiny_bench, write_jsonl(tmp_path / "a.jsonl", fact_rows()[:n] + shuffled), generate=False)
    first, second = run.records[:n], run.records[n:]
    assert [r["question"] for r in first] == [r["question"] for r in second]
    assert [r["options"] for r in first] != [r["options"] for r in second]
    labels = ["closed_book", "rag", "lloco", "cacheblend", "btr@split=2"]
    for label in labels:
        for a, b in zip(first, second):
            x, y = a["results"][label]["choices"], b["results"][label]["choices"]
            assert dict(zip(a["options"], x["loglik"])) == pytest.approx(dict(zip(b["options"], y["loglik"])), abs=1e-4)
            assert a["options"][x["choice"]] == b["options"][y["choice"]], label
            assert a["options"][x["choice_norm"]] == b["options"][y["choice_norm"]], label
        for measure in ("acc", "acc_norm"):
            assert sum(r["results"][label]["choices"][measure] for r in first) == \
                sum(r["results"][label]["choices"][measure] for r in second), (label, measure)
    for row in run.summary:
        assert row["choices_n"] == 2 * n
        assert row["acc_interval"]["low"] <= row["acc"] <= row["acc_interval"]["high"]
    text = summary_markdown(run)
    assert "MC acc [95% CI]" in text and "MC acc_norm [95% CI]" in text


def test_an_options_log_likelihood_is_the_sum_over_its_tokens_of_what_the_method_reads(tiny_bench, tmp_path):
    """RAG's score of an option is the model's own log-probability of the option's tokens after RAG's prompt,
    summed (computed here from the logits, not from the mean the method returns)."""
    from ragdemo.engine.scoring import answer_ids
    from ragdemo.methods import get_method
    from ragdemo.methods.base import params_from

    run = _run(tiny_bench, write_jsonl(tmp_path / "a.jsonl", fact_rows()[:2]), "rag", collection_prefix="mc",
               cleanup=False)
    record, rag = run.records[0], get_method("rag")
    corpus = tiny_bench.corpus("mc-jsonl", create=False)  # the run's collection, kept
    lm = corpus.lm
    prompt, _ = rag.build(record["question"], corpus, params_from(rag.Params, {}))
    for option, score in zip(record["options"], record["results"]["rag"]["choices"]["loglik"]):
        target = answer_ids(lm.tokenizer, option)
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([prompt.ids + target])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt.ids) - 1:-1], dim=-1)
        expected = float(logprobs[torch.arange(len(target)), torch.tensor(target)].sum())
        assert score == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_with_the_answer_only_in_the_document_rag_beats_closed_book(default_settings, tmp_path):
    """The default model on made-up facts (no model can know them): reading the document, RAG picks the right
    option far more often than closed book."""
    from ragdemo.workbench import Workbench

    bench = Workbench(default_settings)
    run = _run(bench, write_jsonl(tmp_path / "facts.jsonl", fact_rows()), "rag", generate=False)
    rows = {r["method"]: r for r in run.summary}
    rag, closed = rows["rag"], rows["closed_book"]
    print({k: (rows[k]["acc"], rows[k]["acc_norm"]) for k in rows})
    assert rag["acc"] >= 0.75 and rag["acc_norm"] >= 0.75
    assert rag["acc"] > closed["acc"] + 0.25 and rag["acc_norm"] > closed["acc_norm"] + 0.25
    assert rag["acc_interval"]["low"] > closed["acc"]
