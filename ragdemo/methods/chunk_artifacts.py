"""Bookkeeping shared by methods that store one artifact per chunk, keyed by the chunk's content (CacheBlend's
KV caches, Lingua's token scores): what is stored, building what is missing, and the storage account."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

from ..engine.prefix import instruction_ids
from ..engine.prompt import Prompt, build_prompt
from ..store import artifact_hash, chunk_key
from .base import Method, Result, StorageAccount


def content_key(chunk: dict) -> str:
    """The store's one per-chunk key (its text, never its row id); identical chunks share one artifact."""
    return chunk_key(chunk["text"])


@dataclass
class Retrieved:
    """What a per-chunk method starts an answer from: the retrieved chunks and RAG's prompt over them."""

    hits: list[dict]
    prompt: Prompt  # [prefix] [passage]... [question]
    result: Result

    @property
    def passages(self) -> list:
        return self.prompt.segments[1:-1]


class PerChunkArtifacts(Method):
    """A method with one artifact per chunk. Subclasses set `artifact_format` and implement `build`."""

    artifact_format: ClassVar[int] = 1  # bump when the blob layout or its recipe changes: old blobs are never read
    build_batch: ClassVar[int] = 1  # chunks per `build` call
    has_prepare = True

    def build(self, corpus, lm, chunks: list[dict]) -> list[bytes]:
        """One artifact per chunk, in order."""
        raise NotImplementedError

    def digest(self, lm) -> str:
        """What shapes every artifact besides the chunk text: format version, model dtype, the prefix it sits behind
        (the model id is a column of its own)."""
        return artifact_hash({"format": self.artifact_format, "dtype": str(lm.dtype),
                              "prefix": instruction_ids(lm)})

    def stored_sizes(self, corpus, lm) -> dict[str, int]:
        rows = corpus.store.rows("SELECT key, nbytes FROM artifacts WHERE method = ? AND model = ? AND params_hash = ?",
                                 (self.name, lm.model_id, self.digest(lm)))
        return {r["key"]: int(r["nbytes"]) for r in rows}

    def storage(self, corpus, params) -> StorageAccount:
        lm = corpus.lm  # the store's one account query, as for every method
        chunk_bytes, _ = corpus.store.artifact_account(corpus.collection_id, self.name, lm.model_id, self.digest(lm), {})
        return StorageAccount(chunk_bytes=chunk_bytes, tokens=corpus.n_tokens())

    def prepare(self, corpus, params, progress=None) -> None:
        lm = self.check(corpus, params)
        corpus.require_documents(self.name)
        have = self.stored_sizes(corpus, lm)
        todo = list({content_key(c): c for c in corpus.chunks() if content_key(c) not in have}.values())
        if progress:
            progress(0.0, f"{len(todo)} chunks to prepare")
        for start in range(0, len(todo), self.build_batch):
            self._store(corpus, lm, todo[start:start + self.build_batch])
            if progress:
                done = min(start + self.build_batch, len(todo))
                progress(done / len(todo), f"prepared chunk {done}/{len(todo)}")

    def check(self, corpus, params):
        """Validate knobs and model; returns the LM."""
        return corpus.lm

    def retrieved(self, question: str, corpus, k: int) -> "Retrieved":
        """The top-k chunks in document order, RAG's prompt over them, and a Result holding the retrieval time."""
        corpus.require_documents(self.name)
        hits, retrieve_s = corpus.retrieve_in_order(question, k)
        return Retrieved(hits, build_prompt(corpus.lm.tokenizer, question, hits), Result(self.name, retrieve_s=retrieve_s))

    def fetch(self, corpus, lm, hits: list[dict], result: Result) -> list[bytes]:
        """The artifact of each hit. Missing ones are built now and stored; that time is `result.prepare_s`
        (never TTFT) and a note says so. Also fills `result.storage_bytes`."""
        keys = [content_key(h) for h in hits]
        blobs = corpus.store.get_artifacts(self.name, lm.model_id, self.digest(lm), keys)
        missing = list({k: h for h, k in zip(hits, keys) if k not in blobs}.values())
        if missing:
            start = time.perf_counter()
            for i in range(0, len(missing), self.build_batch):
                blobs.update(self._store(corpus, lm, missing[i:i + self.build_batch]))
            result.prepare_s = time.perf_counter() - start
            result.notes.append(f"{len(missing)} of {len(hits)} chunks were not prepared yet: prepared now "
                                f"({result.prepare_s:.2f} s, outside TTFT) and stored")
        result.storage_bytes = sum(len(blobs[k]) for k in keys)
        return [blobs[k] for k in keys]

    def _store(self, corpus, lm, chunks: list[dict]) -> dict[str, bytes]:
        blobs = self.build(corpus, lm, chunks)
        digest = self.digest(lm)
        for chunk, blob in zip(chunks, blobs):
            corpus.store.put_artifact(self.name, lm.model_id, digest, content_key(chunk), blob, chunk_id=chunk["chunk_id"])
        return {content_key(c): b for c, b in zip(chunks, blobs)}


def token_budget(share: float, n: int) -> int:
    """share × n tokens, halves rounded up, within 0..n: the exact count a ratio knob asks for."""
    return max(0, min(n, int(math.floor(share * n + 0.5))))
