"""QA metrics: SQuAD's official EM/F1 normalisation, containment, and context value kept from gold NLLs."""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 evaluate script: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, gold: str) -> float:
    """1 when the normalised gold appears in the normalised prediction as whole words ("1973" is not in "19734")."""
    gold_n = normalize_answer(gold)
    if not gold_n:
        return 0.0
    return float(f" {gold_n} " in f" {normalize_answer(prediction)} ")


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    """SQuAD scores a prediction against its best-matching gold answer."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def keyword_recall(prediction: str, keywords: list[str]) -> float:
    """Fraction of keywords whose normalised form appears in the normalised prediction."""
    if not keywords:
        return float("nan")
    return sum(contains(prediction, k) for k in keywords) / len(keywords)


def answer_scores(prediction: str, golds: list[str], keywords: list[str] | None = None) -> dict:
    scores = {"em": best_over_golds(exact_match, prediction, golds),
              "f1": best_over_golds(f1_score, prediction, golds),
              "contains": best_over_golds(contains, prediction, golds)}
    if keywords:
        scores["keywords"] = keyword_recall(prediction, keywords)
    return scores


# Below these gaps (nats per answer token) the reference barely beats closed book: there is no context value
# to keep, and a ratio over such a denominator would only show noise (a 14,319% median on two questions).
MIN_MEAN_GAP = 0.05  # the aggregate: mean of NLL_closed - NLL_reference over the questions
MIN_QUESTION_GAP = 0.1  # per question, for the median
INDICATIVE_BELOW = 20  # fewer questions than this: the figure is shown as indicative


def context_value_kept(closed: list[float], method: list[float], reference: list[float]) -> float:
    """Aggregate (NLL_closed - NLL_method) / (NLL_closed - NLL_reference) as a ratio of summed gaps.

    A per-question ratio explodes when the reference barely beats closed book on that question; summing
    the gaps first weights each question by how much context could help it, which is stable. NaN ("n/a") when
    the reference's mean gap over closed book is below MIN_MEAN_GAP: then nothing is there to keep."""
    closed, method, reference = (np.asarray(x, dtype=float) for x in (closed, method, reference))
    ok = np.isfinite(closed) & np.isfinite(method) & np.isfinite(reference)
    if not ok.any():
        return float("nan")
    gap_ref = float(np.sum(closed[ok] - reference[ok]))
    if gap_ref / ok.sum() < MIN_MEAN_GAP:
        return float("nan")
    return float(np.sum(closed[ok] - method[ok])) / gap_ref


def per_question_value_kept(closed: float, method: float, reference: float,
                            min_gap: float = MIN_QUESTION_GAP) -> float:
    """NaN unless the reference beats closed book on this question by at least `min_gap`: a question where
    the reference is worse than closed book would flip the sign of the ratio."""
    gap = closed - reference
    if not all(np.isfinite([closed, method, reference])) or gap < min_gap:
        return float("nan")
    return (closed - method) / gap


def median_value_kept(triples: list[tuple[float, float, float]]) -> tuple[float, int]:
    """(median per-question value kept, how many questions it is taken over)."""
    ratios = [r for r in (per_question_value_kept(*t) for t in triples) if np.isfinite(r)]
    return (float(np.median(ratios)) if ratios else float("nan")), len(ratios)


# ------------------------------------------------------------------ intervals (GLOSSARY "interval")
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed, so a table regenerated from the same answers gives the same intervals


@dataclass
class Interval:
    """A ratio (1.0 = the reference's) and its 95% paired bootstrap interval; NaN where it cannot be computed."""

    value: float
    low: float
    high: float

    def known(self) -> bool:
        return bool(np.isfinite([self.value, self.low, self.high]).all())

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def text(self) -> str:
        """'89% [84, 95]', or '–' when unknown."""
        if not np.isfinite(self.value):
            return "–"
        if not self.known():
            return f"{100 * self.value:.0f}%"
        return f"{100 * self.value:.0f}% [{100 * self.low:.0f}, {100 * self.high:.0f}]"

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def paired_bootstrap(statistic, columns: list[np.ndarray], samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> Interval:
    """`statistic(*columns)` with a 95% percentile interval: questions are resampled with replacement, every
    column (method and reference) by the same indices, so the pairing that makes the comparison fair is kept."""
    columns = [np.asarray(c, dtype=float) for c in columns]
    n = len(columns[0]) if columns else 0
    value = float(statistic(*columns)) if n else float("nan")
    if n < 2:
        return Interval(value, float("nan"), float("nan"))
    picks = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    with np.errstate(all="ignore"):
        draws = np.array([statistic(*(c[p] for c in columns)) for p in picks], dtype=float)
    draws = draws[np.isfinite(draws)]
    if len(draws) < samples // 2:  # the statistic is undefined on most resamples: no honest interval
        return Interval(value, float("nan"), float("nan"))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(value, float(low), float(high))


def value_kept_interval(closed, method, reference) -> Interval:
    """Context value kept (ratio of summed gaps, `context_value_kept`) with its paired interval."""
    return paired_bootstrap(context_value_kept, [closed, method, reference])


def _ratio_of_means(mine: np.ndarray, ref: np.ndarray) -> float:
    ref_mean = float(np.mean(ref))
    return float(np.mean(mine)) / ref_mean if ref_mean > 0 else float("nan")


def relative_interval(mine, reference) -> Interval:
    """A score's mean over the reference's on the same questions (contains vs ref, F1 vs ref), with its interval."""
    return paired_bootstrap(_ratio_of_means, [mine, reference])


def disagreement(value_kept: Interval, answers: Interval, reference: str = "RAG") -> str:
    """A plain sentence when the two quality signals disagree beyond their intervals, else ''."""
    if not (value_kept.known() and answers.known()) or value_kept.overlaps(answers):
        return ""
    more, less = (("the gold answer's likelihood", "its answers") if value_kept.low > answers.high
                  else ("its answers", "the gold answer's likelihood"))
    return (f"the two quality signals disagree: value kept is {value_kept.text()} of {reference}'s, while answers "
            f"containing the gold answer are {answers.text()} of {reference}'s; {more} credits this method with "
            f"more of {reference}'s quality than {less} do")
