"""Bookkeeping shared by methods that store one artifact per chunk, keyed by the chunk's content (CacheBlend's
KV caches, Lingua's token scores): what is stored, what is missing (as a job for the shared preparation pass),
and the storage account."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..engine.prefix import instruction_ids
from ..engine.prepare_pass import ChunkPass, Needs
from ..engine.prompt import Prompt, build_prompt
from ..store import ArtifactRow, artifact_hash, chunk_key
from .base import Method, Result, StorageAccount
from .preparation import PassJob, run_jobs, stored_or_built, unique_chunks


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
    """A method with one artifact per chunk, made from the chunk's forward in the shared preparation pass.
    Subclasses set `artifact_format` and implement `needs` and `artifact`."""

    artifact_format: ClassVar[int] = 1  # bump when the blob layout or its recipe changes: old blobs are never read
    has_prepare = True

    def needs(self, params) -> Needs:
        """What the artifact is made from (engine/prepare_pass.py)."""
        raise NotImplementedError

    def artifact(self, lm, params, result: ChunkPass) -> bytes:
        """One chunk's artifact from its share of the shared forward."""
        raise NotImplementedError

    def digest(self, lm, params) -> str:
        """What shapes every artifact besides the chunk text: format version, model dtype, the prefix it sits behind
        (the model id is a column of its own)."""
        return artifact_hash({"format": self.artifact_format, "dtype": str(lm.dtype),
                              "prefix": instruction_ids(lm)})

    def storage(self, corpus, params) -> StorageAccount:
        lm = corpus.lm  # the store's one account query, as for every method
        chunk_bytes, _ = corpus.store.artifact_account(corpus.collection_id, self.name, lm.model_id,
                                                       self.digest(lm, params), {})
        return StorageAccount(chunk_bytes=chunk_bytes, tokens=corpus.n_tokens())

    def pass_job(self, corpus, params, chunks: list[dict] | None = None) -> PassJob | None:
        """The chunks (default: the collection's) still without an artifact at these knobs, as a shared-pass job;
        None when every one has it."""
        lm = self.check(corpus, params)
        corpus.require_documents(self.name)
        chunks = corpus.chunks() if chunks is None else chunks
        digest = self.digest(lm, params)
        have = corpus.store.artifact_keys(self.name, lm.model_id, digest, [content_key(c) for c in chunks])
        todo = unique_chunks(chunks, have)
        if not todo:
            return None

        def take(batch: list[dict], results: list[ChunkPass]) -> list[ArtifactRow]:
            return [ArtifactRow(self.name, lm.model_id, digest, content_key(c), self.artifact(lm, params, r),
                                chunk_id=c["chunk_id"]) for c, r in zip(batch, results)]

        return PassJob(self.name, self.needs(params), instruction_ids(lm), todo, take)

    def prepare(self, corpus, params, progress=None) -> None:
        run_jobs(corpus, [self.pass_job(corpus, params)], progress)

    def check(self, corpus, params):
        """Validate knobs and model; returns the LM."""
        return corpus.lm

    def retrieved(self, question: str, corpus, k: int) -> "Retrieved":
        """The top-k chunks in document order, RAG's prompt over them, and a Result holding the retrieval time."""
        corpus.require_documents(self.name)
        hits, retrieve_s = corpus.retrieve_in_order(question, k)
        return Retrieved(hits, build_prompt(corpus.lm.tokenizer, question, hits), Result(self.name, retrieve_s=retrieve_s))

    def fetch(self, corpus, params, hits: list[dict], result: Result) -> list[bytes]:
        """The artifact of each hit. Missing ones are built now and stored; that time is `result.prepare_s`
        (never TTFT) and a note says so. Also fills `result.storage_bytes`."""
        keys = [content_key(h) for h in hits]
        blobs, built, prepare_s = stored_or_built(corpus, self, params, self.digest(corpus.lm, params), hits)
        if built:
            result.prepare_s = prepare_s
            result.notes.append(f"{built} of {len(hits)} chunks were not prepared yet: prepared now "
                                f"({result.prepare_s:.2f} s, outside TTFT) and stored")
        result.storage_bytes = sum(len(blobs[k]) for k in keys)
        return [blobs[k] for k in keys]


def token_budget(share: float, n: int) -> int:
    """share × n tokens, halves rounded up, within 0..n: the exact count a ratio knob asks for."""
    return max(0, min(n, int(math.floor(share * n + 0.5))))
