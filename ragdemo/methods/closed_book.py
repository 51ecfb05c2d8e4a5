"""Closed-book baseline: the question alone. What the model knows without any document."""
from __future__ import annotations

from ..engine.prompt import build_prompt
from .base import PromptMethod, Result


class ClosedBook(PromptMethod):
    name = "closed_book"
    label = "Closed book"
    order = 0

    def build(self, question, corpus, params):
        return build_prompt(corpus.lm.tokenizer, question, []), Result(self.name)
