"""The operations a user can do, shared by the CLI and the UI so both stay thin and behave the same."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .config import Settings
from .engine.generate import TimedStream
from .errors import NotSupported, UserError
from .ingest import IngestReport, ingest_files
from .methods import get_method, registry
from .methods.base import Progress, Result, params_from
from .models import Models
from .store import Corpus, IndexCache, Store

DEFAULT_METHODS = ["closed_book", "full_context", "rag"]


class Workbench:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.store = Store(self.settings.home)
        self.models = Models(self.settings)
        self.indexes = IndexCache(self.store)

    def corpus(self, collection: str | None = None, create: bool = True) -> Corpus:
        name = collection or self.settings.default_collection
        if not create:
            self.store.collection_id(name, create=False)
        return Corpus(self.store, name, self.models, self.indexes)

    # -------------------------------------------------------------- library
    def ingest(self, files: list[tuple[str, bytes | Path]], collection: str | None = None,
               progress: Progress | None = None) -> list[IngestReport]:
        corpus = self.corpus(collection)
        return ingest_files(self.store, corpus.collection_id, files, self.models.lm.tokenizer, self.models.embedder,
                            self.settings.chunk_tokens, int(self.settings.max_file_mb * 1e6), progress)

    def documents(self, collection: str | None = None) -> list[dict]:
        corpus = self.corpus(collection)
        per_method = self.store.artifact_bytes_by_document(corpus.collection_id)
        docs = self.store.documents(corpus.collection_id)
        for doc in docs:
            doc["storage"] = {m: b for (d, m), b in per_method.items() if d == doc["id"]}
        return docs

    def delete(self, ref: str, collection: str | None = None) -> dict:
        return self.store.delete_document(self.corpus(collection, create=False).collection_id, ref)

    # ------------------------------------------------------------- methods
    def prepare(self, methods: list[str], collection: str | None = None, knobs: dict | None = None,
                progress: Progress | None = None) -> list[str]:
        corpus = self.corpus(collection, create=False)
        corpus.require_documents("prepare")
        done = []
        for i, name in enumerate(methods):
            method = get_method(name)
            if not method.has_prepare:
                done.append(f"{name}: nothing to prepare")
                continue
            params = params_from(method.Params, (knobs or {}).get(name))
            scaled = _scaled(progress, i, len(methods), name)
            with corpus.lm.lock:
                method.prepare(corpus, params, scaled)
            done.append(f"{name}: prepared ({method.storage(corpus, params).total:,} bytes stored)")
        return done

    def finetune(self, method_name: str, collection: str | None = None, knobs: dict | None = None,
                 progress: Progress | None = None) -> str:
        self.require_private("fine-tuning")
        method = get_method(method_name)
        if not method.has_finetune:
            raise UserError(f"{method_name} has no fine-tuning step")
        corpus = self.corpus(collection, create=False)
        corpus.require_documents("finetune")
        params = params_from(method.Params, (knobs or {}).get(method_name))
        with corpus.lm.lock:
            return method.finetune(corpus, params, progress)

    def check_question(self, question: str) -> str:
        question = (question or "").strip()
        if not question:
            raise UserError("the question is empty")
        limit = self.settings.max_question_chars
        if len(question) > limit:
            raise UserError(f"the question is {len(question)} characters; the limit is {limit} (RAGDEMO_MAX_QUESTION_CHARS)")
        return question

    def ask(self, question: str, methods: list[str], collection: str | None = None, knobs: dict | None = None,
            stream: Callable[[str, str], None] | None = None, record: bool = True) -> list[Result]:
        """Run each method in turn; the model is shared, so answers are serialised through its lock."""
        question = self.check_question(question)
        self.models.lm  # a bad model id or quantisation request is reported before anything else
        corpus = self.corpus(collection, create=False)
        started = time.perf_counter()
        limit = self.settings.max_compare_s
        results = []
        for name in methods:
            method = get_method(name)
            params = params_from(method.Params, {"max_new_tokens": self.settings.max_new_tokens, **(knobs or {}).get(name, {})})
            on_token = (lambda text, n=name: stream(n, text)) if stream else None
            if limit > 0:  # one visitor's Compare may not hold the shared model queue past the limit
                if time.perf_counter() - started >= limit:
                    results.append(_over_time(name, corpus.lm.model_id, limit))
                    continue
                on_token = TimedStream(on_token, started + limit)
            try:
                with corpus.lm.lock:
                    result = method.answer(question, corpus, params, on_token)
            except NotSupported as exc:  # one method can't run on this model; the others still answer
                result = Result(name, model=corpus.lm.model_id, error=str(exc), notes=[str(exc)])
            if getattr(on_token, "cut", False):
                result.notes.append(f"answer cut after {result.new_tokens} tokens: this Compare reached its "
                                    f"{limit:g} s limit (RAGDEMO_MAX_COMPARE_S)")
            if record:
                self.store.add_run(corpus.collection_id, question, result.to_dict())
            results.append(result)
        return results

    def runs(self, collection: str | None = None, limit: int = 50) -> list[dict]:
        return self.store.runs(self.corpus(collection).collection_id, limit)

    def use_settings(self, settings: Settings) -> None:
        """Switch model, device or quantisation. The new model loads first, so a failure (no hub, no CUDA)
        raises ModelUnavailable and leaves the workbench on the previous model."""
        models = Models(settings)
        models.lm
        self.settings, self.models = settings, models

    def require_private(self, what: str) -> None:
        """Long jobs that would hold the one model queue for minutes are off on a shared Space."""
        if self.settings.shared:
            raise UserError(f"{what} is turned off on this shared app (RAGDEMO_SHARED=1): it would keep every other "
                            "visitor waiting for minutes. Run it on your own machine or a private Space.")

    @staticmethod
    def methods():
        return registry()


def _over_time(name: str, model: str, limit: float) -> Result:
    message = (f"not run: this Compare used its {limit:g} s limit on the methods before it "
               "(RAGDEMO_MAX_COMPARE_S); ask again with fewer methods")
    return Result(name, model=model, error=message, notes=[message])


def _scaled(progress: Progress | None, index: int, count: int, name: str) -> Progress | None:
    if progress is None:
        return None
    return lambda fraction, message: progress((index + fraction) / count, f"{name}: {message}")


