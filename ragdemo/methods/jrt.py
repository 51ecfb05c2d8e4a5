"""JRT-Prompt (Arora et al. 2024, "Just read twice"): question, context, context again, question."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine.prompt import Prompt, Segment, build_prompt
from .base import Params, PromptMethod, Result, knob
from .full_context import fit_to_budget


@dataclass
class JrtParams(Params):
    context: str = knob("rag", "rag = top-k chunks; full = every document (cut to fit, both copies)",
                        choices=("rag", "full"))
    k: int = knob(5, "chunks retrieved when context=rag", label="chunks retrieved", min=1, max=500)
    max_context_tokens: int = knob(0, "whole-prompt budget; 0 = the model window minus the answer budget",
                                   label="max context tokens", min=0, max=131072)


class Jrt(PromptMethod):
    name = "jrt"
    label = "JRT (read twice)"
    order = 5
    Params = JrtParams

    def build(self, question, corpus, params):
        corpus.require_documents(self.name)
        lm = corpus.lm
        result = Result(self.name)
        if params.context == "rag":
            passages, result.retrieve_s = corpus.retrieve_in_order(question, params.k)
        else:  # "full": the choices are declared on JrtParams
            start = time.perf_counter()
            passages = [{"doc": d["name"], "text": d["text"]} for d in corpus.documents()]
            result.load_s = time.perf_counter() - start
        prompt = build_prompt(lm.tokenizer, question, passages, repeat_context=True)
        fit_both_copies(prompt, params.max_context_tokens or (lm.window - params.max_new_tokens), result)
        return prompt, result


def fit_both_copies(prompt: Prompt, budget: int, result: Result) -> None:
    """Cut the first copy with full_context's rule, so that it fits twice, then repeat it again."""
    first = [s for s in prompt.segments if s.kind == "passage" and s.mark != "repeated"]
    fixed = [s for s in prompt.segments if s.kind != "passage"]
    fixed_tokens = sum(len(s.ids) for s in fixed)
    context_tokens = sum(len(s.ids) for s in first)
    if fixed_tokens + 2 * context_tokens <= budget:
        return
    per_copy = max(0, (budget - fixed_tokens) // 2)
    single = Prompt(fixed[:1] + first + fixed[1:])
    fit_to_budget(single, fixed_tokens + per_copy, Result("jrt"))
    kept = [s for s in single.segments if s.kind == "passage"]
    repeated = [Segment("passage", s.ids, "repeated", s.source) for s in kept]
    prompt.segments = fixed[:1] + kept + repeated + fixed[1:]
    result.notes.append(f"context truncated to {per_copy} tokens per copy (from {context_tokens}) so that "
                        f"both copies fit in {budget} tokens")
