"""Closed-book baseline: the question alone. What the model knows without any document."""
from __future__ import annotations

from ..engine.prompt import build_prompt
from .base import PromptMethod, Result


class ClosedBook(PromptMethod):
    name = "closed_book"
    label = "Closed book"
    order = 0
    card = """### Closed book (baseline)
The question alone, no documents, with an instruction to answer from what the model knows (the other methods'
instruction points at a context). It shows what the model already knows, and it is the zero point of
**context value kept**: every other method is scored by how much of the gap between this and the reference (RAG,
the bench's default reference) it closes.
- Exact: plain generation with the model's chat template.
- Knobs: max new tokens."""

    def build(self, question, corpus, params):
        return build_prompt(corpus.lm.tokenizer, question, []), Result(self.name)
