"""The operations a user can do, shared by the CLI and the UI so both stay thin and behave the same."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Settings
from .engine.warmup import warm_model
from .engine.generate import TimedStream
from .errors import NotSupported, UserError
from .ingest import IngestReport, ingest_files
from .methods import get_method, registry
from .methods.base import Progress, Result, params_from
from .methods.preparation import Prepared, prepare_methods
from .models import Models
from .store import Corpus, IndexCache, Store
from .units import fmt_bytes

# Methods that answer in seconds on a CPU; full context (minutes on a long collection) is opt-in.
DEFAULT_METHODS = ["closed_book", "rag", "retro", "btr", "lloco"]
DEMO_COLLECTION = "demo"
DEMO_ARTICLE = "Amazon_rainforest.txt"  # the shortest bundled SQuAD article (~3.5k tokens)
DEMO_EXAMPLES = 8
DEMO_QUESTIONS = "squad/demo_questions.txt"  # under assets/: the curated example questions, with why


@dataclass
class Warmup:
    """What a warm-up did, so the app and the CLI can say it (and tests can check nothing was skipped)."""

    model_s: float = 0.0
    collection_s: float = 0.0
    done: list[str] = field(default_factory=list)


class Workbench:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.store = Store(self.settings.home)
        self.models = Models(self.settings)
        self.indexes = IndexCache(self.store)
        self._warm_models: set[int] = set()  # id() of LM objects already warmed in this process
        self._warm_collections: set[tuple[int, int]] = set()  # (LM id, collection id)

    # --------------------------------------------------------------- warm-up
    def warm(self, collection: str | None = None, progress: Progress | None = None) -> Warmup:
        """Warm everything an answer touches before any timed answer: the model (a short prefill and decode
        steps, prefix caches), the embedder, and the collection's FAISS index. Idempotent and cheap once done."""
        report = Warmup()
        lm = self.models.lm
        if id(lm) not in self._warm_models:
            if progress:
                progress(0.0, "warming up the model…")
            with lm.lock:
                report.model_s = warm_model(lm)
            self._warm_models.add(id(lm))
            report.done.append("model")
        corpus = self._existing_corpus(collection)
        if corpus is not None and (id(lm), corpus.collection_id) not in self._warm_collections:
            if progress:
                progress(0.5, "warming up retrieval…")
            report.collection_s = self._warm_collection(corpus)
            report.done.append("collection")
        if progress:
            progress(1.0, "warm")
        return report

    def _existing_corpus(self, collection: str | None) -> Corpus | None:
        name = collection or self.settings.default_collection
        try:
            self.store.collection_id(name, create=False)
        except UserError:
            return None
        return self.corpus(name)

    def _warm_collection(self, corpus: Corpus) -> float:
        """Embedder, index (built or read now rather than inside the first answer's retrieval) and one search."""
        started = time.perf_counter()
        if not corpus.is_empty():
            corpus.search(["warm-up query"], 1)
        self._warm_collections.add((id(corpus.lm), corpus.collection_id))
        return time.perf_counter() - started

    def corpus(self, collection: str | None = None, create: bool = True, retriever: str | None = None) -> Corpus:
        """`retriever` (float | binary) overrides the collection's stored choice for this corpus only."""
        name = collection or self.settings.default_collection
        if not create:
            self.store.collection_id(name, create=False)
        return Corpus(self.store, name, self.models, self.indexes, retriever)

    def set_retrieval(self, collection: str | None = None, retriever: str | None = None,
                      rescore: int | None = None) -> dict:
        """The collection's retriever (float | binary) and binary rescoring factor, stored with it:
        {retriever, rescore} after the change (None leaves a setting as it is)."""
        return self.corpus(collection).set_retrieval(retriever, rescore)

    # -------------------------------------------------------------- library
    def ingest(self, files: list[tuple[str, bytes | Path]], collection: str | None = None,
               progress: Progress | None = None, prepare: bool = False) -> list[IngestReport]:
        """Store the files; with `prepare` (the CLI's and the app's default) also build the offline artifacts of
        every method that has them at its default knobs, so that no answer pays for one-time preparation. The
        preparation lines come back as reports with status "prepared" or "skipped"."""
        corpus = self.corpus(collection)
        share = 0.4 if prepare else 1.0
        ingest_progress = (lambda f, m: progress(share * f, m)) if progress else None
        before = self.store.artifact_bytes(corpus.collection_id)
        reports = ingest_files(self.store, corpus.collection_id, files, self.models.lm.tokenizer,
                               self.models.embedder, self.settings.chunk_tokens, int(self.settings.max_file_mb * 1e6),
                               ingest_progress)
        # before preparing: it rebuilds the default knobs' artifacts, not those prepared at other knobs
        reports += [IngestReport(m, "dropped", line) for m, line in self._dropped(corpus, before).items()]
        if prepare and any(r.status == "added" for r in reports):
            rest = (lambda f, m: progress(share + (1 - share) * f, m)) if progress else None
            reports += self._prepare_defaults(corpus, rest)
        self._warm_collection(corpus)
        return reports

    def _prepare_defaults(self, corpus: Corpus, progress: Progress | None) -> list[IngestReport]:
        """Every method with offline artifacts, at its default knobs, in one shared pass over the chunks; one that
        cannot run on this model (or whose defaults do not fit it, e.g. a split deeper than a tiny model) is
        reported as skipped, not as a failed upload."""
        names = [name for name, method in registry().items() if method.has_prepare]
        done = self._prepare(corpus, names, None, progress, skip_unsupported=True)
        return [IngestReport(p.name, p.status, p.line) for p in done]

    def documents(self, collection: str | None = None) -> list[dict]:
        corpus = self._existing_corpus(collection)  # reading never creates a collection
        if corpus is None:
            return []
        per_method = self.store.artifact_bytes_by_document(corpus.collection_id)
        docs = self.store.documents(corpus.collection_id)
        for doc in docs:
            doc["storage"] = {m: b for (d, m), b in per_method.items() if d == doc["id"]}
        return docs

    def shared_storage(self, collection: str | None = None) -> dict[str, int]:
        """Bytes each method keeps for the whole collection rather than per document (BTR's decoder, a LoRA
        adapter, an offline-merged codebook): the documents table's last row."""
        corpus = self._existing_corpus(collection)
        return self.store.artifact_bytes_shared(corpus.collection_id) if corpus is not None else {}

    def delete(self, ref: str, collection: str | None = None) -> dict:
        """Delete one document; the returned row's `dropped` lists what other artifacts went with it."""
        corpus = self.corpus(collection, create=False)
        doc = self.store.resolve_document(corpus.collection_id, ref)
        before = self.store.artifact_bytes(corpus.collection_id)
        own = {m: b for (d, m), b in self.store.artifact_bytes_by_document(corpus.collection_id).items()
               if d == doc["id"]}
        doc = self.store.delete_document(corpus.collection_id, ref)
        doc["dropped"] = list(self._dropped(corpus, before, own).values())
        self._warm_collection(corpus)  # the index is rebuilt now, not inside the next answer
        return doc

    def _dropped(self, corpus: Corpus, before: dict[str, int], own: dict[str, int] | None = None) -> dict[str, str]:
        """Per method, a line for the bytes a change of the collection's content took beyond the document's own
        (`own`): artifacts fit on every document (BTR's decoder and the codes it made, an adapter trained on
        the collection) no longer match it, so the store drops them rather than serve them stale."""
        after = self.store.artifact_bytes(corpus.collection_id)
        lines = {}
        for method, size in before.items():
            gone = size - after.get(method, 0) - (own or {}).get(method, 0)
            if gone > 0:
                lines[method] = (f"{method}: {fmt_bytes(gone)} built for the collection's previous content were dropped "
                                 "(they depend on every document); Prepare rebuilds them at the knobs it runs, or the "
                                 "method's next answer does")
        return lines

    # ------------------------------------------------------------- methods
    def prepare(self, methods: list[str], collection: str | None = None, knobs: dict | None = None,
                progress: Progress | None = None) -> list[str]:
        corpus = self.corpus(collection, create=False)
        corpus.require_documents("prepare")
        return [p.line for p in self._prepare(corpus, methods, knobs, progress)]

    def _prepare(self, corpus: Corpus, methods: list[str], knobs: dict | None, progress: Progress | None,
                 skip_unsupported: bool = False) -> list[Prepared]:
        """The methods at their knobs together: one forward per chunk batch feeds all of them (methods/preparation.py)."""
        items = []
        for name in methods:
            method = get_method(name)
            items.append((name, method, params_from(method.Params, (knobs or {}).get(name))))
        # held per step, not for the whole job: a Compare from another user waits for one batch of chunks
        with corpus.lm.lock.per_step(progress) as step:
            done, _ = prepare_methods(corpus, items, step, skip_unsupported)
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
        # held per training step: the adapter trains on a private copy of the module tree (engine/lora.py), so
        # answers between two steps see the base model
        with corpus.lm.lock.per_step(progress) as step:
            return method.finetune(corpus, params, step)

    def check_question(self, question: str) -> str:
        question = (question or "").strip()
        if not question:
            raise UserError("the question is empty")
        limit = self.settings.max_question_chars
        if len(question) > limit:
            raise UserError(f"the question is {len(question)} characters; the limit is {limit} (RAGDEMO_MAX_QUESTION_CHARS)")
        return question

    def ask(self, question: str, methods: list[str], collection: str | None = None, knobs: dict | None = None,
            stream: Callable[[str, str], None] | None = None, record: bool = True,
            retriever: str | None = None) -> list[Result]:
        """Run each method in turn; the model is shared, so answers are serialised through its lock.
        `retriever` overrides the collection's retriever for this question only."""
        question = self.check_question(question)
        self.models.lm  # a bad model id or quantisation request is reported before anything else
        corpus = self.corpus(collection, create=False, retriever=retriever)
        started = time.perf_counter()
        self.warm(corpus.collection)
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
            if result.retrieve_s > 0:
                result.notes.append(corpus.retriever_note)
            if getattr(on_token, "cut", False):
                result.notes.append(f"answer cut after {result.new_tokens} tokens: this Compare reached its "
                                    f"{limit:g} s limit (RAGDEMO_MAX_COMPARE_S)")
            if record:
                # the knobs that differ from the method's defaults, so History tells runs apart
                knobs_used = {k: v for k, v in vars(params).items() if v != getattr(method.Params(), k, None)}
                self.store.add_run(corpus.collection_id, question, {**result.to_dict(), "params": knobs_used})
            results.append(result)
        return results

    def runs(self, collection: str | None = None, limit: int = 50) -> list[dict]:
        corpus = self._existing_corpus(collection)
        return self.store.runs(corpus.collection_id, limit) if corpus else []

    # ---------------------------------------------------------- collections
    def create_collection(self, name: str) -> str:
        self.store.collection_id(name, create=True)
        return name

    def rename_collection(self, name: str, new_name: str) -> None:
        self.store.rename_collection(name, new_name)

    def delete_collection(self, name: str) -> None:
        self.store.delete_collection(name)

    # ----------------------------------------------------------------- demo
    @staticmethod
    def demo_examples(n: int = DEMO_EXAMPLES) -> list[tuple[str, list[str]]]:
        """(question, gold answers) of the first `n` demo questions listed in assets/squad/demo_questions.txt
        (why these, there), in that order."""
        from .bench.datasets import load_squad

        (haystack,) = load_squad().haystacks
        by_id = {q.id: q for q in haystack.questions if q.meta.get("doc") == DEMO_ARTICLE}
        return [(by_id[i].question, by_id[i].answers) for i in demo_question_ids()[:n]]

    def load_demo(self, progress: Progress | None = None, prepare: bool = True) -> list[IngestReport]:
        """The bundled SQuAD article as collection `demo`, prepared for every method with offline artifacts.
        Idempotent: a second call finds the document by its content and prepares only what is missing (an
        interrupted first call is finished)."""
        from .bench.datasets import load_squad

        (haystack,) = load_squad().haystacks
        files = [(name, text.encode()) for name, text in haystack.documents if name == DEMO_ARTICLE]
        share = 0.3 if prepare else 1.0
        reports = self.ingest(files, DEMO_COLLECTION, progress and (lambda f, m: progress(share * f, m)), prepare=False)
        if prepare:
            rest = progress and (lambda f, m: progress(share + (1 - share) * f, m))
            reports += self._prepare_defaults(self.corpus(DEMO_COLLECTION), rest)
        return reports

    def use_settings(self, settings: Settings) -> None:
        """Switch model, device or quantisation. The new model loads first, so a failure (no hub, no CUDA)
        raises ModelUnavailable and leaves the workbench on the previous model."""
        models = Models(settings)
        models.lm
        self.settings, self.models = settings, models
        self.warm()

    def require_private(self, what: str) -> None:
        """Long jobs that would keep the one model busy for minutes are off on a shared Space."""
        if self.settings.shared:
            raise UserError(f"{what} is turned off on this shared app (RAGDEMO_SHARED=1): it would keep the one model "
                            "busy for minutes and slow every other visitor's answers. Run it on your own machine or a "
                            "private Space.")

    @staticmethod
    def methods():
        return registry()


def demo_question_ids() -> list[str]:
    """The curated SQuAD ids of the demo's example questions, in order (comments and blank lines skipped)."""
    from .bench.datasets import ASSETS

    lines = (ASSETS / DEMO_QUESTIONS).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _over_time(name: str, model: str, limit: float) -> Result:
    message = (f"not run: this Compare used its {limit:g} s limit on the methods before it "
               "(RAGDEMO_MAX_COMPARE_S); ask again with fewer methods")
    return Result(name, model=model, error=message, notes=[message])
