"""Teacher-forced negative log-likelihood of a gold answer: the stable quality signal for tiny models."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]


def mean_nll(logits: torch.Tensor, targets: list[int]) -> float:
    """`logits[0, i]` predicts `targets[i]`."""
    target = torch.tensor(targets, device=logits.device)
    return float(F.cross_entropy(logits[0, : len(targets)].float(), target))


def summed_log_likelihood(tokenizer, answer: str, mean_nll_per_token: float) -> float:
    """The log-likelihood of the whole answer from a method's mean NLL per answer token (`Method.nll`): every
    method scores the tokens `answer_ids` gives, so their count turns the mean back into the sum (what
    multiple-choice scoring compares, as lm-evaluation-harness does)."""
    return -float(mean_nll_per_token) * len(answer_ids(tokenizer, answer))


def nll_of_answer(lm, prompt_ids: list[int], answer: str) -> float:
    """Mean NLL per answer token after the prompt."""
    target = answer_ids(lm.tokenizer, answer)
    ids = torch.tensor([prompt_ids + target], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids).logits
    return mean_nll(logits[:, len(prompt_ids) - 1:], target)
