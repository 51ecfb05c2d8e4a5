"""Metrics against hand-checked cases (SQuAD v1.1 evaluate-script normalisation)."""
from __future__ import annotations

import math

import pytest

from ragdemo.bench.metrics import (answer_scores, contains, context_value_kept, exact_match, f1_score,
                                   keyword_recall, normalize_answer, per_question_value_kept)


@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),
    ("  An   apple, the pie. ", "apple pie"),
    ("A", ""),
    ("the-cat", "thecat"),  # punctuation goes before articles, as in the official script
    ("Theory of the atom", "theory of atom"),  # "the" only as a whole word
    ("1,000 B.C.", "1000 bc"),
    ("Dolores\tPark\n", "dolores park"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a cat", "the cat.") == 1.0
    assert exact_match("cats", "cat") == 0.0


def test_f1_partial_overlap_by_hand():
    # "cat sat on mat" vs "cat on mat": overlap 3, precision 3/4, recall 1 -> 2*(3/4)/(7/4) = 6/7
    assert f1_score("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # precision 1/2, recall 1 -> 2/3
    assert f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    # multiset overlap: x x y vs x y y share one x and one y -> P = R = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to nothing: no overlap, as in the official script


def test_contains_whole_words():
    assert contains("It happened in October 1973.", "October 1973") == 1.0
    assert contains("the year 19734", "1973") == 0.0
    assert contains("Answer: The Normans.", "Normans") == 1.0
    assert contains("anything", "the") == 0.0  # empty gold after normalisation never matches


def test_answer_scores_best_over_golds():
    scores = answer_scores("in October 1973", ["October 1973", "1973", "October"])
    assert scores["em"] == 0.0
    # best F1 is against "October 1973": P = 2/3 ("in" is extra), R = 1 -> 0.8
    assert scores["f1"] == pytest.approx(0.8)
    assert scores["contains"] == 1.0
    assert "keywords" not in scores
    needle = answer_scores("Eat a sandwich in the park.", ["eat a sandwich and sit in Dolores Park"],
                           ["sandwich", "Dolores Park"])
    assert needle["keywords"] == 0.5 and needle["contains"] == 0.0
    assert keyword_recall("sit in dolores park", ["sandwich", "Dolores Park"]) == 0.5


def test_context_value_kept_is_a_ratio_of_summed_gaps():
    # gaps closed-method: 1, 0; closed-reference: 2, 1 -> 1/3
    assert context_value_kept([3, 2], [2, 2], [1, 1]) == pytest.approx(1 / 3)
    assert context_value_kept([3, 2], [1, 1], [1, 1]) == pytest.approx(1.0)
    assert context_value_kept([3, 2], [4, 3], [1, 1]) == pytest.approx(-2 / 3)  # worse than closed book
    assert math.isnan(context_value_kept([1, 1], [1, 1], [2, 2]))  # reference no better than closed book
    # a NaN (missing NLL) drops that question for all three
    assert context_value_kept([3, 2, 9], [2, 2, float("nan")], [1, 1, 0]) == pytest.approx(1 / 3)
    assert per_question_value_kept(3, 2, 1) == pytest.approx(0.5)
    assert math.isnan(per_question_value_kept(1, 0.5, 1))


def test_value_kept_is_na_when_the_reference_barely_beats_closed_book():
    # a tiny positive denominator (0.01 nats per question) must not turn noise into a huge percentage
    assert math.isnan(context_value_kept([3.0, 2.0], [1.0, 1.0], [2.99, 1.99]))
    assert context_value_kept([3.0, 2.0], [2.5, 1.5], [2.0, 1.0]) == pytest.approx(0.5)


def test_median_value_kept_skips_questions_where_the_reference_does_not_help():
    from ragdemo.bench.metrics import median_value_kept

    triples = [(3.0, 2.0, 1.0),   # reference helps: 0.5
               (3.0, 1.0, 1.0),   # reference helps: 1.0
               (2.0, 1.0, 2.5),   # reference worse than closed book: the ratio would flip sign, skipped
               (2.0, 0.0, 1.9999)]  # a tiny gap would give 14,000%+: skipped
    median, n = median_value_kept(triples)
    assert n == 2 and median == pytest.approx(0.75)
    assert math.isnan(per_question_value_kept(2.0, 1.0, 2.5))
    assert math.isnan(median_value_kept([(2.0, 1.0, 2.5)])[0])


def test_readme_glossary_is_generated_from_the_result_glossary():
    from pathlib import Path

    from ragdemo.methods.base import GLOSSARY, Result, glossary_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert glossary_markdown() in readme
    numeric = {f for f, v in Result.__dataclass_fields__.items() if v.type in ("int", "float")}
    assert numeric <= set(GLOSSARY), numeric - set(GLOSSARY)  # every number a user sees is documented
