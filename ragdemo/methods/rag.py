"""Top-k RAG baseline: the k chunks nearest the question, one passage each, in document order."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.prompt import build_prompt
from .base import Params, PromptMethod, Result, knob


@dataclass
class RagParams(Params):
    k: int = knob(5, "the k chunks nearest the question are read", label="chunks retrieved", min=1, max=500)
    join: bool = knob(False, "join touching chunks into one passage (not the layout the reuse methods store: a study)")


class Rag(PromptMethod):
    name = "rag"
    label = "Top-k RAG"
    order = 2
    Params = RagParams

    def build(self, question, corpus, params):
        corpus.require_documents(self.name)
        hits, retrieve_s = corpus.retrieve_in_order(question, params.k)
        prompt = build_prompt(corpus.lm.tokenizer, question, join_touching(hits) if params.join else hits)
        return prompt, Result(self.name, retrieve_s=retrieve_s)


def join_touching(passages: list[dict]) -> list[dict]:
    """Passages in reading order with the chunks that follow each other in one document joined into one."""
    joined: list[dict] = []
    for passage in passages:
        last = joined[-1] if joined else None
        if last and last["doc_id"] == passage["doc_id"] and last["last_ord"] + 1 == passage["ord"]:
            last.update(text=last["text"] + passage["text"], last_ord=passage["ord"],
                        chunk_ids=last["chunk_ids"] + [passage["chunk_id"]], score=max(last["score"], passage["score"]))
        else:
            joined.append({**passage, "last_ord": passage["ord"], "chunk_ids": list(passage["chunk_ids"])})
    return joined
