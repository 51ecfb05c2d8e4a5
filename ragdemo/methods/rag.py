"""Top-k RAG baseline: the k chunks nearest the question, grouped into passages in document order."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.prompt import build_prompt
from ..store import group_passages
from .base import Params, PromptMethod, Result, knob


@dataclass
class RagParams(Params):
    k: int = knob(5, "the k chunks nearest the question are read", label="chunks retrieved", min=1, max=50)


class Rag(PromptMethod):
    name = "rag"
    label = "Top-k RAG"
    order = 2
    Params = RagParams
    card = """### Top-k RAG (baseline)
The question is embedded with all-MiniLM-L6-v2; the k nearest 64-token chunks (exact FAISS search) are
retrieved, neighbouring chunks of one document are joined, and the passages are placed in document order
before the question. Every passage token is processed by every layer at query time.
- Exact: standard retrieve-then-read; this is the reference that BTR and LLoCO are measured against.
- Knobs: k (chunks retrieved)."""

    def build(self, question, corpus, params):
        corpus.require_documents(self.name)
        hits, retrieve_s = corpus.retrieve(question, params.k)
        prompt = build_prompt(corpus.lm.tokenizer, question, group_passages(hits))
        return prompt, Result(self.name, retrieve_s=retrieve_s)
