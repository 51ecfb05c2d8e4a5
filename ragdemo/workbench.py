"""The operations a user can do, shared by the CLI and the UI so both stay thin and behave the same.

One file on purpose: it is one class whose methods are the app's API (every CLI command and UI tab calls them),
with the small records and listeners those methods take and return.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Settings
from .deadline import Deadline, DeadlinePassed
from .engine.warmup import warm_model
from .engine.generate import TimedStream
from .errors import NotSupported, UserError
from .params import KnobError
from .ingest import IngestReport, ingest_files
from .methods import get_method, registry
from .machine import CpuMeter
from .methods.base import Params, Progress, Result, check_on_model, params_from, repeated
from .methods.preparation import Prepared, prepare_methods
from .models import Models
from .models.lm import forget_lm, release_memory
from .store import Corpus, IndexCache, Store
from .store.content_lock import ContentLock
from .units import fmt_bytes

log = logging.getLogger(__name__)
# Methods that answer in seconds on a CPU; full context (minutes on a long collection) is opt-in.
DEFAULT_METHODS = ["closed_book", "rag", "retro", "btr", "lloco"]
DEMO_COLLECTION = "demo"
DEMO_ARTICLE = "Amazon_rainforest.txt"  # the shortest bundled SQuAD article (~3.5k tokens)
DEMO_EXAMPLES = 8
DEMO_QUESTIONS = "squad/demo_questions.txt"  # under assets/: the curated example questions, with why
SETTINGS_READ_ONLY = ("Settings are read-only on this shared app (RAGDEMO_SHARED=1): the operator sets the model "
                      "with the variables RAGDEMO_MODEL, RAGDEMO_DEVICE, RAGDEMO_QUANTIZE and RAGDEMO_MAX_NEW_TOKENS")


@dataclass
class Warmup:
    """What a warm-up did, so the app and the CLI can say it (and tests can check nothing was skipped)."""

    model_s: float = 0.0
    collection_s: float = 0.0
    done: list[str] = field(default_factory=list)


class Startup:
    """The app's first model load, run in the background as the app starts (`Workbench.start`), so no button
    waits on it unannounced: the first start after install converts the embedded model (about 20 s). Pages and
    callers read `fraction` and `message` while it runs; `ready` once the model is loaded."""

    def __init__(self):
        self.fraction, self.message, self.error = 1.0, "ready", ""
        self._done = threading.Event()
        self._done.set()  # nothing to wait for until start() is called

    def begin(self) -> None:
        self._done.clear()
        self.error = ""
        self.update(0.0, "loading the model…")

    def update(self, fraction: float, message: str) -> None:
        if message.split(":")[0] != self.message.split(":")[0]:  # one log line per stage, for the server's log
            log.info("start-up: %s", message)
        self.fraction, self.message = max(0.0, min(1.0, float(fraction))), message

    def finish(self, error: str = "") -> None:
        self.error = error
        self.update(1.0, f"the model did not load: {error}" if error else "ready")
        self._done.set()

    @property
    def ready(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


class Workbench:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.store = Store(self.settings.home)
        self.models = Models(self.settings)
        self.indexes = IndexCache(self.store)
        # a Compare or a Prepare reads one state of the content; deleting, renaming, adding documents or changing
        # the retriever waits for them (store/content_lock.py)
        self.content = ContentLock()
        self.startup = Startup()
        self._warm_models: set[int] = set()  # id() of LM objects already warmed in this process
        self._warm_collections: set[tuple[int, int]] = set()  # (LM id, collection id)

    # --------------------------------------------------------------- start-up
    def start(self) -> threading.Thread:
        """Load (on the first start: convert) and warm the model in the background, as the app starts, with
        progress in `self.startup`. Callers that need the model meanwhile wait through `load_model`."""
        startup = self.startup
        startup.begin()

        def run():
            try:
                self.models.load(startup.update)
            except Exception as exc:  # reported by the first caller that needs the model, in its own words
                startup.finish(str(exc))
                return
            startup.finish()
            self.warm()  # the warm-up too, so the first Compare is timed like every later one

        thread = threading.Thread(target=run, name="ragdemo-startup", daemon=True)
        thread.start()
        return thread

    def load_model(self, progress: Progress | None = None):
        """The LM, with progress while it loads (the first start converts the embedded model, about 20 s). While
        the start-up load runs, its progress is relayed to this caller rather than a silent wait."""
        while not self.startup.wait(0.5):
            if progress:
                progress(self.startup.fraction, self.startup.message)
        return self.models.load(progress)

    # --------------------------------------------------------------- warm-up
    def warm(self, collection: str | None = None, progress: Progress | None = None) -> Warmup:
        """Warm everything an answer touches before any timed answer: the model (a short prefill and decode
        steps, prefix caches), the embedder, and the collection's FAISS index. Idempotent and cheap once done."""
        report = Warmup()
        lm = self.load_model(progress)
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
        with self.content.writing():  # a Compare retrieves with one retriever from its first method to its last
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
        self.load_model(ingest_progress)  # the tokenizer comes with the model: a first start's conversion is said
        with self.content.writing():
            before = self.store.artifact_bytes(corpus.collection_id)
            reports = ingest_files(self.store, corpus.collection_id, files, self.models.lm.tokenizer,
                                   self.models.embedder, self.settings.chunk_tokens,
                                   int(self.settings.max_file_mb * 1e6), ingest_progress)
            # before preparing: it rebuilds the default knobs' artifacts, not those prepared at other knobs
            reports += [IngestReport(m, "dropped", line) for m, line in self._dropped(corpus, before).items()]
        if prepare and any(r.status == "added" for r in reports):
            rest = (lambda f, m: progress(share + (1 - share) * f, m)) if progress else None
            reports += self._prepare_defaults(corpus, rest)
        self._warm_collection(corpus)
        return reports

    def _prepare_defaults(self, corpus: Corpus, progress: Progress | None,
                          deadline: Deadline | None = None) -> list[IngestReport]:
        """Every method with offline artifacts, at its default knobs, in one shared pass over the chunks; one that
        cannot run on this model (or whose defaults do not fit it, e.g. a split deeper than a tiny model) is
        reported as skipped, not as a failed upload. One deadline for the whole preparation."""
        names = [name for name, method in registry().items() if method.has_prepare]
        checked = self.job_deadline(deadline).checked(progress, "preparation")
        try:
            with self.content.reading():  # artifacts for one state of the collection
                done = self._prepare(corpus, names, None, checked, skip_unsupported=True)
        except DeadlinePassed as exc:
            return [IngestReport(name, "skipped", f"{', '.join(names)}: not all prepared ({exc})") for name in names[:1]]
        return [IngestReport(p.name, p.status, p.line) for p in done]

    def prepare_defaults(self, collection: str | None = None, progress: Progress | None = None,
                         deadline: Deadline | None = None) -> list[IngestReport]:
        """What is missing of the collection's artifacts at every method's default knobs (after an upload, for the
        demo): one report per method, "prepared" or "skipped" with the reason."""
        return self._prepare_defaults(self.corpus(collection, create=False), progress, deadline)

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
        with self.content.writing():  # after the Compares and Prepares reading the collection now
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
                lines[method] = (f"{method}: {fmt_bytes(gone)} it had built from all the previous documents was removed, "
                                 f"because it depends on every document; Prepare builds it again, or {method}'s next "
                                 "answer does")
        return lines

    # ------------------------------------------------------------- methods
    def method_params(self, methods: list[str], knobs: dict | None = None,
                      progress: Progress | None = None) -> dict[str, Params]:
        """Every knob checked before anything runs, the same way for the CLI, the UI, the bench and Python callers:
        unknown methods and knobs, the bounds and choices declared on each Params (knobs of methods not in
        `methods` too), then the rules that need the model for the methods that will run. Returns {method:
        Params} for `methods`, with the Settings' answer length unless a knob sets one."""
        knobs = knobs or {}
        for name in knobs:
            get_method(name)  # an unknown method name is refused, not ignored
        checked = {}
        for name in dict.fromkeys([*methods, *knobs]):
            method = get_method(name)
            params = params_from(method.Params, {"max_new_tokens": self.settings.max_new_tokens,
                                                 **(knobs.get(name) or {})}, name)
            if name in methods:
                checked[name] = params
        lm = self.load_model(progress) if checked else None  # after the checks that need no model: those fail fast
        for name, params in checked.items():
            check_on_model(get_method(name), params, lm)
        return checked

    def prepare(self, methods: list[str], collection: str | None = None, knobs: dict | None = None,
                progress: Progress | None = None, deadline: Deadline | None = None) -> list[str]:
        """Build the methods' offline artifacts at these knobs. It stops at the first step past its deadline (the
        sooner of `deadline` and RAGDEMO_MAX_JOB_S, on a shared app), keeping every step finished."""
        with self.content.reading():  # artifacts for one state of the collection
            corpus = self.corpus(collection, create=False)
            corpus.require_documents("prepare")
            done = self._prepare(corpus, methods, knobs, self.job_deadline(deadline).checked(progress, "prepare"))
            return [p.line for p in done]

    def _prepare(self, corpus: Corpus, methods: list[str], knobs: dict | None, progress: Progress | None,
                 skip_unsupported: bool = False) -> list[Prepared]:
        """The methods at their knobs together: one forward per chunk batch feeds all of them (methods/preparation.py).
        Every knob is checked first; with `skip_unsupported` a method whose knobs do not fit this model is skipped."""
        self.refuse_training_when_shared(methods, knobs or {}, "Prepare")
        self.load_model(progress)
        items, skipped = [], []
        for name in methods:
            try:
                items.append((name, get_method(name), self.method_params([name], knobs)[name]))
            except (NotSupported, UserError) as exc:
                if not skip_unsupported:
                    raise
                skipped.append(Prepared(name, "skipped", f"{name}: not prepared here: {exc}"))
        # held per step, not for the whole job: a Compare from another user waits for one batch of chunks
        with corpus.lm.lock.per_step(progress) as step:
            done, _ = prepare_methods(corpus, items, step, skip_unsupported)
        return sorted(skipped + done, key=lambda p: methods.index(p.name))

    def finetune(self, method_name: str, collection: str | None = None, knobs: dict | None = None,
                 progress: Progress | None = None) -> str:
        self.require_private("fine-tuning")
        method = get_method(method_name)
        if not method.has_finetune:
            raise UserError(f"{method_name} has no fine-tuning step")
        with self.content.reading():  # an adapter for one state of the collection
            corpus = self.corpus(collection, create=False)
            corpus.require_documents("finetune")
            params = self.method_params([method_name], knobs)[method_name]
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
            retriever: str | None = None, repeats: int = 1) -> list[Result]:
        """`compare` with a plain text stream: stream(method, delta)."""
        listener = _TextListener(stream) if stream else None
        return self.compare(question, methods, collection, knobs, listener, record=record, retriever=retriever,
                            repeats=repeats)

    def compare(self, question: str, methods: list[str], collection: str | None = None, knobs: dict | None = None,
                listener: "CompareListener | None" = None, deadline: Deadline | None = None, record: bool = True,
                retriever: str | None = None, repeats: int = 1) -> list[Result]:
        """One Compare: each method answers in turn (the model is shared, so answers are serialised through its
        lock), all under one deadline, the sooner of `deadline` and RAGDEMO_MAX_COMPARE_S counted from this call:
        a method decoding at the deadline is cut there, the methods after it are not started. `listener` hears
        each method start, stream and finish. `retriever` overrides the collection's for this question only.
        `repeats` (1, 3 or 5): each method answers that many times in a row; its times are the medians."""
        started = time.perf_counter()
        listener = listener or CompareListener()
        question = self.check_question(question)
        repeats = check_repeats(repeats)
        self.models.lm  # a bad model id or quantisation request is reported before anything else
        knobs = knobs or {}
        self.refuse_training_when_shared(methods, knobs, "answer")
        checked = self.method_params(methods, knobs)  # a refused knob stops the comparison before any answer
        limit = Deadline.after(self.settings.max_compare_s, "RAGDEMO_MAX_COMPARE_S", started).sooner(deadline)
        with self.content.reading():  # every method of this Compare sees the same documents
            corpus = self.corpus(collection, create=False, retriever=retriever)
            self.warm(corpus.collection)
            return [self._compare_one(name, question, corpus, checked[name], listener, limit, record, repeats)
                    for name in methods]

    def _compare_one(self, name: str, question: str, corpus: Corpus, params: Params, listener: "CompareListener",
                     limit: Deadline, record: bool, repeats: int = 1) -> Result:
        if limit.passed():
            result = _over_time(name, corpus.lm.model_id, limit)
            listener.finished(result)
            return result
        method = get_method(name)
        on_token = TimedStream(lambda text: listener.text(name, text), limit.at)
        listener.started(name)
        try:
            with corpus.lm.lock, CpuMeter() as meter:
                runs = [method.answer(question, corpus, params, on_token)]
                runs += _repeats(method, question, corpus, params, limit, repeats - 1, on_token)
            result = repeated(runs, meter.share.others)
        except (NotSupported, KnobError) as exc:  # one method can't run on this model (at its defaults); the
            # others still answer (a knob the user set was refused in method_params, before any answer)
            result = Result(name, model=corpus.lm.model_id, error=str(exc), notes=[str(exc)])
        except Exception as exc:  # the listener decides: the CLI stops with the error, the UI puts it on the card
            result = listener.failed(name, exc)
            listener.finished(result)
            return result
        if result.retrieve_s > 0:
            result.notes.append(corpus.retriever_note)
        if on_token.cut:
            result.notes.append(f"answer cut after {result.new_tokens} tokens: this Compare reached its "
                                f"{limit.describe()}")
        if record:
            # the knobs that differ from the method's defaults, so History tells runs apart
            knobs_used = {k: v for k, v in vars(params).items() if v != getattr(method.Params(), k, None)}
            self.store.add_run(corpus.collection_id, question, {**result.to_dict(), "params": knobs_used})
        listener.finished(result)
        return result

    def answer_seconds(self, limit: int = 300) -> dict[str, float]:
        """{method: mean total seconds of its recent answers on this machine}, from History (every collection):
        the app's estimate of how long a Compare or a benchmark will take."""
        seconds: dict[str, list[float]] = {}
        for run in self.store.runs(None, limit):
            seconds.setdefault(run["method"], []).append(float(run["result"].get("total_s") or 0))
        return {method: sum(values) / len(values) for method, values in seconds.items()}

    def runs(self, collection: str | None = None, limit: int = 50) -> list[dict]:
        corpus = self._existing_corpus(collection)
        return self.store.runs(corpus.collection_id, limit) if corpus else []

    # ---------------------------------------------------------- collections
    def create_collection(self, name: str) -> str:
        self.store.collection_id(name, create=True)
        return name

    def rename_collection(self, name: str, new_name: str) -> None:
        with self.content.writing():
            self.store.rename_collection(name, new_name)

    def delete_collection(self, name: str) -> None:
        with self.content.writing():
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
            reports += self.prepare_defaults(DEMO_COLLECTION, progress and (lambda f, m: progress(share + (1 - share) * f, m)))
        return reports

    def use_settings(self, settings: Settings) -> None:
        """Switch model, device or quantisation. The new model loads first, so a failure (no hub, no CUDA)
        raises ModelUnavailable and leaves the workbench on the previous model. Refused on a shared app: one
        visitor would switch everyone's model."""
        if self.settings.shared:
            raise UserError(SETTINGS_READ_ONLY)
        previous = self.models.loaded()
        models = Models(settings)
        models.lm
        self.settings, self.models = settings, models
        if previous is not None and previous is not models.lm:  # one model in memory: the previous one and its caches go
            gone = id(previous)  # ids are reused once it is freed: a new model must not pass for warm
            self._warm_models.discard(gone)
            self._warm_collections = {(lm, c) for lm, c in self._warm_collections if lm != gone}
            forget_lm(previous)
            del previous
            release_memory()
        self.warm()

    def job_deadline(self, deadline: Deadline | None = None) -> Deadline:
        """A long job's deadline from now: RAGDEMO_MAX_JOB_S (set by default on a shared app), or `deadline` when
        that is sooner."""
        return Deadline.after(self.settings.max_job_s, "RAGDEMO_MAX_JOB_S").sooner(deadline)

    def refuse_training_when_shared(self, methods: list[str], knobs: dict, where: str) -> None:
        """On a shared app nothing trains an adapter: a `train` knob would do it inside this answer or Prepare,
        holding the one model for minutes. One line naming the knob and the way that works."""
        if not self.settings.shared:
            return
        for name in methods:
            params = params_from(get_method(name).Params, knobs.get(name))
            if getattr(params, "train", False):
                raise UserError(f"{name}.train=1 would train an adapter in this {where}, which is off on this shared "
                                "app (RAGDEMO_SHARED=1); set train=0: answers read what Prepare in the Library "
                                "built, and adapters are trained on a private copy of the app")

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


def _over_time(name: str, model: str, limit: Deadline) -> Result:
    message = (f"not run: this Compare used its {limit.describe()} on the methods before it; ask again with "
               "fewer methods")
    return Result(name, model=model, error=message, notes=[message])


REPEATS = (1, 3, 5)  # answers per method in one Compare: the card shows the median time and the range


def check_repeats(repeats) -> int:
    try:
        if int(repeats) in REPEATS and float(repeats) == int(repeats):
            return int(repeats)
    except (TypeError, ValueError):
        pass
    raise UserError(f"repeats must be one of {', '.join(map(str, REPEATS))} (got {repeats})")


def _repeats(method, question: str, corpus: Corpus, params, limit: Deadline, count: int, first: TimedStream) -> list:
    """The answer again, `count` times, silently: only runs that finished inside the Compare's deadline count (a
    run cut short would look faster than it is)."""
    runs = []
    for _ in range(count if not first.cut else 0):
        stream = TimedStream(None, limit.at)
        result = method.answer(question, corpus, params, stream)
        if stream.cut or result.error:
            break
        runs.append(result)
    return runs


class CompareListener:
    """What one Compare tells its caller while it runs (the UI's cards, the CLI's progress lines). The defaults do
    nothing, except `failed`: a method's error ends the Compare there (the CLI's one-line error). The UI's listener
    puts the error on that method's card instead and lets the other methods answer."""

    def started(self, method: str) -> None:
        pass

    def text(self, method: str, delta: str) -> None:
        pass

    def finished(self, result: Result) -> None:
        pass

    def failed(self, method: str, exc: Exception) -> Result:
        raise exc


class _TextListener(CompareListener):
    def __init__(self, stream: Callable[[str, str], None]):
        self.stream = stream

    def text(self, method: str, delta: str) -> None:
        self.stream(method, delta)
