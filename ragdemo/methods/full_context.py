"""Full-context baseline: every document of the collection, in order, cut to fit the model window."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine.prompt import build_prompt
from .base import Params, PromptMethod, Result, knob


@dataclass
class FullContextParams(Params):
    max_context_tokens: int = knob(0, "0 = the model window minus the answer budget", label="max context tokens",
                                   min=0, max=131072)


class FullContext(PromptMethod):
    name = "full_context"
    label = "Full context"
    order = 1
    Params = FullContextParams

    def build(self, question, corpus, params):
        start = time.perf_counter()
        corpus.require_documents(self.name)
        lm = corpus.lm
        passages = [{"doc": d["name"], "text": d["text"]} for d in corpus.documents()]
        prompt = build_prompt(lm.tokenizer, question, passages)
        load_s = time.perf_counter() - start
        result = Result(self.name, load_s=load_s)
        budget = params.max_context_tokens or (lm.window - params.max_new_tokens)
        fit_to_budget(prompt, budget, result)
        return prompt, result


def fit_to_budget(prompt, budget: int, result: Result) -> None:
    """Cut passage tokens from the end until the whole prompt fits; say so in the notes."""
    overflow = len(prompt) - budget
    if overflow <= 0:
        return
    total = len(prompt)
    passages = [s for s in prompt.segments if s.kind == "passage"]
    for segment in reversed(passages):
        cut = min(overflow, len(segment.ids))
        segment.ids = segment.ids[: len(segment.ids) - cut]
        overflow -= cut
        if overflow <= 0:
            break
    prompt.segments = [s for s in prompt.segments if s.ids or s.kind != "passage"]
    result.notes.append(f"context truncated to {budget} tokens (from {total}) to fit the model window")
