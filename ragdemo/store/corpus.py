"""A `Corpus` is what a method sees: one collection of the store, the models, and retrieval over it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..config import Settings
from ..errors import UserError
from ..models import Models
from ..units import fmt_bytes
from .db import RETRIEVERS, Store
from .index import IndexCache


@dataclass
class Corpus:
    store: Store
    collection: str
    models: Models
    indexes: IndexCache | None = None
    retriever: str | None = None  # float | binary for this corpus only; None = the collection's own setting
    collection_id: int = field(init=False)

    def __post_init__(self):
        self.collection_id = self.store.collection_id(self.collection)
        self.indexes = self.indexes or IndexCache(self.store)
        if self.retriever is not None and self.retriever not in RETRIEVERS:
            raise UserError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {self.retriever!r}")

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
        return not self.store.has_documents(self.collection_id)

    def require_documents(self, method: str) -> None:
        if self.is_empty():
            raise UserError(f"{method} needs documents: collection {self.collection!r} is empty; ingest some first")

    def refuse_collection_prepare_when_shared(self, method: str, what: str) -> None:
        """An answer that finds `what` missing would build it from the whole collection first, holding the one
        model for minutes: on a shared app it is refused instead, with the way that works."""
        if self.settings.shared:
            raise UserError(f"{method}: {what} not prepared for these knobs; on this shared app (RAGDEMO_SHARED=1) an "
                            "answer never prepares the whole collection: run Prepare in the Library with these knobs "
                            "set, then ask again")

    def documents(self) -> list[dict]:
        return self.store.document_texts(self.collection_id)

    def n_tokens(self) -> int:
        """The collection's tokens: the denominator of every method's amortised bytes per token."""
        return self.store.collection_tokens(self.collection_id)

    def chunks(self) -> list[dict]:
        return self.store.chunks(self.collection_id)

    # ------------------------------------------------------------ retrieval
    def retrieval_settings(self) -> dict:
        """{retriever, rescore} in force: this corpus's override, else the collection's stored choice."""
        state = self.store.collection_state(self.collection_id)
        return {"retriever": self.retriever or state["retriever"], "rescore": int(state["rescore"])}

    def set_retrieval(self, retriever: str | None = None, rescore: int | None = None) -> dict:
        """Store the collection's retriever (float | binary) and rescoring factor; every later corpus uses it."""
        state = self.store.set_retrieval(self.collection_id, retriever, rescore)
        return {"retriever": state["retriever"], "rescore": int(state["rescore"])}

    @property
    def retriever_note(self) -> str:
        """One line for a Result's notes: which retriever finds the passages."""
        settings = self.retrieval_settings()
        if settings["retriever"] == "binary":
            return (f"retriever: binary (1-bit sign codes, {self.embedder.dim // 8} B per chunk, Hamming search, "
                    f"top k x {settings['rescore']} rescored with the float vectors)")
        return f"retriever: float (exact L2 over the {self.embedder.dim}-d embeddings)"

    def index(self, kind: str | None = None):
        return self.indexes.get(self.collection_id, self.embedder.name, kind or self.retrieval_settings()["retriever"])

    def nearest(self, vectors: np.ndarray, k: int, settings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, chunk ids) [n, k'] of embedded queries under `settings` (default: in force)."""
        settings = settings or self.retrieval_settings()
        index = self.index(settings["retriever"])
        if index.kind == "binary":
            return index.search(vectors, k, settings["rescore"])
        return index.search(vectors, k)

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        """For each query, its k nearest chunks by L2 over MiniLM embeddings, best first. Each hit names the
        retriever that found it (`retriever`)."""
        settings = self.retrieval_settings()
        distances, ids = self.nearest(self.embedder.embed(queries), k, settings)
        found = self.store.chunks_by_id([int(i) for i in ids.ravel() if i >= 0])
        results = []
        for row_d, row_i in zip(distances, ids):
            hits = []
            for d, i in zip(row_d, row_i):
                if i < 0 or int(i) not in found:  # gone since the index was read (another process deleted it)
                    continue
                chunk = dict(found[int(i)])
                chunk["distance"] = float(d)
                chunk["score"] = round(1.0 - float(d) / 2.0, 4)  # cosine, since vectors are unit length
                chunk["retriever"] = settings["retriever"]
                hits.append(chunk)
            results.append(hits)
        return results

    def retrieve_in_order(self, query: str, k: int) -> tuple[list[dict], float]:
        """Top-k chunks as every method reads them (`reading_order`) and the seconds retrieval took."""
        hits, seconds = self.retrieve(query, k)
        return reading_order(hits), seconds

    def retrieve(self, query: str, k: int) -> tuple[list[dict], float]:
        """Top-k chunks for one query and the seconds it took."""
        self.embedder  # load outside the timed span: model loading is not retrieval
        self.index()
        start = time.perf_counter()
        hits = self.search([query], k)[0]
        return hits, time.perf_counter() - start

    def compare_retrievers(self, queries: list[str], k: int = 5, rescore: int | None = None) -> "RetrieverComparison":
        """Binary against float on the same queries: recall@k of the binary top-k (with and without rescoring)
        against the exact float top-k, and both indexes' bytes. The per-query chunk ids are kept so a benchmark
        can also score each retriever against gold passages."""
        rescore = int(rescore or self.retrieval_settings()["rescore"])
        vectors = self.embedder.embed(queries)
        float_index, binary_index = self.index("float"), self.index("binary")
        _, float_ids = float_index.search(vectors, k)
        _, binary_ids = binary_index.search(vectors, k, rescore)
        _, hamming_ids = binary_index.hamming_search(vectors, k)
        return RetrieverComparison(
            k=k, rescore=rescore, chunks=len(float_index), float32_bytes=float_index.float32_bytes,
            float_index_bytes=float_index.nbytes, binary_index_bytes=binary_index.nbytes, id_bytes=float_index.id_bytes,
            recall_at_k=_recall(binary_ids, float_ids), recall_at_k_hamming_only=_recall(hamming_ids, float_ids),
            float_ids=float_ids.tolist(), binary_ids=binary_ids.tolist())


@dataclass
class RetrieverComparison:
    k: int
    rescore: int
    chunks: int
    float32_bytes: int  # the embeddings as float32: chunks x d x 4, binary quantisation's usual yardstick
    float_index_bytes: int  # what the float index scans: chunks x d x 2 (float16, as SQLite stores them)
    binary_index_bytes: int  # chunks x d / 8
    id_bytes: int  # the chunk-id map each index carries on top (8 B per chunk)
    recall_at_k: float  # mean share of the float top-k that the binary retriever (with rescoring) also returns
    recall_at_k_hamming_only: float  # the same for the Hamming top-k before rescoring
    float_ids: list[list[int]]
    binary_ids: list[list[int]]

    @property
    def size_ratio(self) -> float:
        """Sign codes against float32 embeddings (32x for any d divisible by 8)."""
        return self.float32_bytes / max(1, self.binary_index_bytes)

    @property
    def float_index_ratio(self) -> float:
        """Sign codes against this app's float index, which already keeps float16 (16x)."""
        return self.float_index_bytes / max(1, self.binary_index_bytes)

    def summary(self) -> str:
        return (f"binary retriever on {len(self.float_ids)} queries over {self.chunks} chunks: recall@{self.k} "
                f"{self.recall_at_k:.3f} against float with rescore {self.rescore} ({self.recall_at_k_hamming_only:.3f} "
                f"Hamming only); sign codes {fmt_bytes(self.binary_index_bytes)}, {self.size_ratio:.0f}x smaller than float32 "
                f"embeddings ({fmt_bytes(self.float32_bytes)}) and {self.float_index_ratio:.0f}x smaller than the float16 float "
                f"index ({fmt_bytes(self.float_index_bytes)}); each index also maps chunk ids ({fmt_bytes(self.id_bytes)})")


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    shares = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
              for f, t in zip(found, truth)]
    return float(np.mean(shares)) if shares else 0.0


def reading_order(hits: list[dict]) -> list[dict]:
    """The one passage layout every method reads (RAG, the reuse methods, JRT, RETRO): one passage per retrieved
    chunk, in document order (the model reads text as it was written, not shuffled by score). One passage per
    chunk, because that is the unit every reuse method stores (a chunk's KV, states or scores, computed alone):
    RAG reading the same token sequence makes "value kept" measure the approximation and nothing else."""
    ordered = sorted(hits, key=lambda h: (h["doc_id"], h["ord"]))
    return [{**hit, "chunk_ids": [hit["chunk_id"]]} for hit in ordered]
