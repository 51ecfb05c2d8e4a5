"""A `Corpus` is what a method sees: one collection of the store, the models, and retrieval over it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


from ..config import Settings
from ..errors import UserError
from ..models import Models
from .db import Store
from .index import IndexCache


@dataclass
class Corpus:
    store: Store
    collection: str
    models: Models
    indexes: IndexCache | None = None
    collection_id: int = field(init=False)

    def __post_init__(self):
        self.collection_id = self.store.collection_id(self.collection)
        self.indexes = self.indexes or IndexCache(self.store)

    @property
    def settings(self) -> Settings:
        return self.models.settings

    @property
    def lm(self):
        return self.models.lm

    @property
    def embedder(self):
        return self.models.embedder

    def is_empty(self) -> bool:
        return not self.store.documents(self.collection_id)

    def require_documents(self, method: str) -> None:
        if self.is_empty():
            raise UserError(f"{method} needs documents: collection {self.collection!r} is empty; ingest some first")

    def documents(self) -> list[dict]:
        return self.store.document_texts(self.collection_id)

    def n_tokens(self) -> int:
        """The collection's tokens: the denominator of every method's amortised bytes per token."""
        return self.store.collection_tokens(self.collection_id)

    def chunks(self) -> list[dict]:
        return self.store.chunks(self.collection_id)

    def index(self):
        return self.indexes.get(self.collection_id, self.embedder.name)

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        """For each query, its k nearest chunks by L2 over MiniLM embeddings, best first."""
        vectors = self.embedder.embed(queries)
        distances, ids = self.index().search(vectors, k)
        found = self.store.chunks_by_id([int(i) for i in ids.ravel() if i >= 0])
        results = []
        for row_d, row_i in zip(distances, ids):
            hits = []
            for d, i in zip(row_d, row_i):
                if i < 0:
                    continue
                chunk = dict(found[int(i)])
                chunk["distance"] = float(d)
                chunk["score"] = round(1.0 - float(d) / 2.0, 4)  # cosine, since vectors are unit length
                hits.append(chunk)
            results.append(hits)
        return results

    def retrieve(self, query: str, k: int) -> tuple[list[dict], float]:
        """Top-k chunks for one query and the seconds it took."""
        self.embedder  # load outside the timed span: model loading is not retrieval
        self.index()
        start = time.perf_counter()
        hits = self.search([query], k)[0]
        return hits, time.perf_counter() - start


def group_passages(hits: list[dict]) -> list[dict]:
    """Adjacent retrieved chunks of one document become one passage; passages keep document order,
    so the model reads text as it was written rather than shuffled by score."""
    ordered = sorted(hits, key=lambda h: (h["doc_id"], h["ord"]))
    passages: list[dict] = []
    for hit in ordered:
        last = passages[-1] if passages else None
        if last and last["doc_id"] == hit["doc_id"] and last["last_ord"] + 1 == hit["ord"]:
            last["text"] += hit["text"]
            last["last_ord"] = hit["ord"]
            last["chunk_ids"].append(hit["chunk_id"])
            last["score"] = max(last["score"], hit["score"])
        else:
            passages.append({"doc": hit["doc"], "doc_id": hit["doc_id"], "chunk_id": hit["chunk_id"],
                             "chunk_ids": [hit["chunk_id"]], "last_ord": hit["ord"], "text": hit["text"],
                             "score": hit["score"]})
    return passages


