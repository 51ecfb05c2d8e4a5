"""Multiple-choice scoring, as lm-evaluation-harness scores QuALITY-style questions: each option is scored by its
log-likelihood as the answer, given the question and the context a method reads (the method's own `nll` read
path), and the method picks the most likely option.

- acc: the option with the highest log-likelihood summed over its tokens is the gold one.
- acc_norm: the same after dividing each option's log-likelihood by its length in characters, so long options
  are not penalised for having more tokens (the harness's acc_norm).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.scoring import summed_log_likelihood
from .metrics import Interval, paired_bootstrap

MEASURES = ("acc", "acc_norm")


@dataclass
class OptionScores:
    """One question's options as one method scored them."""

    nll: list[float]  # mean NLL per token of each option (what `Method.nll` returns)
    loglik: list[float]  # summed over each option's tokens
    chars: list[int]  # each option's length in characters
    gold: int

    def choice(self) -> int:
        return int(np.argmax(self.loglik))  # ties: the first option, as numpy's argmax

    def choice_norm(self) -> int:
        return int(np.argmax(np.asarray(self.loglik) / np.maximum(np.asarray(self.chars), 1)))

    def to_dict(self) -> dict:
        return {"nll": self.nll, "loglik": self.loglik, "chars": self.chars, "gold": self.gold,
                "choice": self.choice(), "choice_norm": self.choice_norm(),
                "acc": float(self.choice() == self.gold), "acc_norm": float(self.choice_norm() == self.gold)}


def score_options(method, question: str, options: list[str], gold: int, corpus, params) -> OptionScores:
    """Every option through the method's own `nll` (its retrieval, caches, compression: what it would read to
    answer), turned into a summed log-likelihood by the option's token count."""
    tokenizer = corpus.lm.tokenizer
    nll = []
    for option in options:
        with corpus.lm.lock:
            nll.append(float(method.nll(question, option, corpus, params)))
    loglik = [summed_log_likelihood(tokenizer, option, value) for option, value in zip(options, nll)]
    return OptionScores(nll, loglik, [len(option) for option in options], gold)


def accuracy_interval(correct: list[float]) -> Interval:
    """The share of questions answered right with its 95% bootstrap interval (questions resampled; the fixed
    seed draws the same questions for every method of a run, so their intervals are paired)."""
    return paired_bootstrap(np.mean, [correct]) if correct else Interval(*[float("nan")] * 3)
