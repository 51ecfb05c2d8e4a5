"""The benchmark runner: fresh collection(s), every question asked with every chosen method, one record per
question. Which methods (bench/specs.py), the summary rows (bench/summary.py) and the written outputs
(bench/report.py) have their own modules; their public names can be imported from here as well.

For each question and method it records the generated answer's EM / F1 / contains and its timing and token
counts from `Method.answer`, and the teacher-forced NLL of the first gold answer from `Method.nll`. Closed
book's NLL and the reference's NLL are always computed, so "context value kept" can be reported for every
method against a reference that is named in the output. A multiple-choice question is also scored option by
option through the same `Method.nll` (bench/choices.py): accuracy and length-normalised accuracy.
"""
from __future__ import annotations

import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from ..config import DEFAULT_MAX_NEW_TOKENS  # one default shared with Ask and the CLI
from ..errors import NotSupported, UserError
from ..machine import memory_gib
from ..methods import registry
from ..methods.base import Progress, Result
from .choices import score_options
from .datasets import Dataset, Haystack, Question
from .metrics import answer_scores
from .order import rotated
from .report import (MD_HEADERS, column_header, disagreements, fmt_cell, has_choices, load_run, load_run_or_summary,
                     needle_grids, reference_name, row_label, summary_columns, summary_markdown,
                     summary_markdown_table, write_outputs)
from .specs import REFERENCES, MethodSpec, apply_limits, check_specs_on_model, parse_method_specs, with_baselines
from .summary import SUMMARY_COLUMNS, interval_of, summarize

__all__ = ["BenchRun", "run_bench", "rotated", "machine_info", "available_methods", "RESULT_FIELDS",
           "DEFAULT_MAX_NEW_TOKENS", "ProgressCallback",
           "REFERENCES", "MethodSpec", "apply_limits", "check_specs_on_model", "parse_method_specs", "with_baselines",
           "SUMMARY_COLUMNS", "interval_of", "summarize",
           "MD_HEADERS", "column_header", "disagreements", "fmt_cell", "has_choices", "load_run", "load_run_or_summary",
           "needle_grids", "reference_name", "row_label", "summary_columns", "summary_markdown",
           "summary_markdown_table", "write_outputs"]

RESULT_FIELDS = ["prompt_tokens", "processed_tokens", "cached_tokens", "overhead_tokens", "new_tokens", "retrieve_s", "load_s", "prepare_s",
                 "ttft_s", "decode_s", "total_s", "decode_tok_s", "storage_bytes", "bytes_per_token", "chunk_bytes_per_token"]


@dataclass
class BenchRun:
    meta: dict
    specs: list[MethodSpec]
    records: list[dict]  # one per question: id, question, answers, meta, haystack, results{label: {...}}
    storage: dict  # label -> list of bytes per haystack
    prepare_s: dict  # label -> seconds of prepare summed over haystacks
    summary: list[dict] = field(default_factory=list)


def run_bench(workbench, dataset: Dataset, specs: list[MethodSpec], reference: str = "rag",
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: Progress | None = None,
              collection_prefix: str | None = None, cleanup: bool = True, extra_meta: dict | None = None,
              existing_collection: str | None = None, time_budget_s: float | None = None) -> BenchRun:
    """Ask every question of `dataset` with every spec; collections are created fresh (unique names) and
    dropped afterwards when `cleanup`. With `time_budget_s`, no new question starts once it is spent: the run
    is then partial and says so in its meta and summary."""
    if not dataset.n_questions:
        raise UserError("the dataset has no questions")
    specs, reference = with_baselines(specs, reference, None)
    run_id = collection_prefix or f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    lm = workbench.models.lm  # a bad model is reported before any work
    total_units = sum(len(h.questions) * len(specs) + len(specs) for h in dataset.haystacks)
    tick = _Ticker(progress, total_units)
    records, storage, prepare_s = [], {s.label: [] for s in specs}, {s.label: 0.0 for s in specs}
    started = time.time()
    stopped = ""
    for haystack in dataset.haystacks:
        if _over(started, time_budget_s):
            stopped = _stop_note(records, dataset, time_budget_s)
            break
        collection = existing_collection if (existing_collection and not haystack.documents) else f"{run_id}-{haystack.key}"
        corpus = _fill_collection(workbench, collection, haystack, tick)
        workbench.warm(collection)  # no answer below pays for a cold model, embedder or index
        try:
            for spec in specs:
                seconds, nbytes = _prepare(spec, corpus, max_new_tokens, tick)
                prepare_s[spec.label] += seconds
                storage[spec.label].append(nbytes)
            asked = {s.label: sum(1 for r in records if s.label in r["results"] and r["results"][s.label].get("answered"))
                     for s in specs}
            for question in haystack.questions:
                if _over(started, time_budget_s):
                    stopped = _stop_note(records, dataset, time_budget_s)
                    break
                record = {"id": question.id, "question": question.question, "answers": question.answers,
                          "keywords": question.keywords, "meta": question.meta, "haystack": haystack.key,
                          "results": {}}
                if question.options:
                    record.update(options=question.options, gold=question.gold)
                for spec in rotated(specs, len(records)):
                    tick.step(f"{spec.label}: {question.question[:40]}")
                    if spec.limit is not None and asked[spec.label] >= spec.limit and spec.label not in {reference, "closed_book"}:
                        continue
                    record["results"][spec.label] = _ask_one(spec, question, corpus, max_new_tokens)
                    asked[spec.label] += int(record["results"][spec.label].get("answered", False))
                records.append(record)
        finally:
            if cleanup and haystack.documents:
                _drop_collection(workbench, collection)
    meta = {"dataset": dataset.name, "description": dataset.description, "reference": reference,
            "closed_book": "closed_book", "model": lm.model_id, "dtype": str(lm.dtype).replace("torch.", ""),
            "device": str(lm.device), "max_new_tokens": max_new_tokens, "attention": getattr(lm, "attention", ""),
            "methods": [{"label": s.label, "method": s.name, "knobs": s.knobs, "limit": s.limit,
                         "answers": s.answers} for s in specs],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": round(time.time() - started, 1),
            "machine": machine_info(), "n_questions": len(records), "partial": stopped, **(extra_meta or {})}
    run = BenchRun(meta, specs, records, storage, prepare_s)
    run.summary = summarize(run)
    tick.done()
    return run


def _over(started: float, budget: float | None) -> bool:
    return budget is not None and time.time() - started > budget


def _stop_note(records: list, dataset: Dataset, budget: float) -> str:
    return (f"partial: stopped after {len(records)} of {dataset.n_questions} questions when the time budget "
            f"of {budget / 60:.0f} min was spent")


class _Ticker:
    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.count = progress, max(total, 1), 0

    def step(self, message: str) -> None:
        if self.progress:
            self.progress(min(self.count / self.total, 1.0), message)
        self.count += 1

    def done(self) -> None:
        if self.progress:
            self.progress(1.0, "done")


def _fill_collection(workbench, collection: str, haystack: Haystack, tick: _Ticker):
    if not haystack.documents:
        return workbench.corpus(collection, create=False)
    files = [(name, text.encode("utf-8")) for name, text in haystack.documents]
    reports = workbench.ingest(files, collection, prepare=False)  # each spec prepares with its own knobs, timed
    failed = [r.message for r in reports if r.status == "error"]
    if failed:
        raise UserError(f"could not ingest the benchmark documents: {failed[0]}")
    return workbench.corpus(collection)


def _drop_collection(workbench, collection: str) -> None:
    """The benchmark's collection and, by cascade, its documents, chunks, vectors and artifacts."""
    store = workbench.store
    store.drop_collection(store.collection_id(collection))


def _prepare(spec: MethodSpec, corpus, max_new_tokens: int, tick: _Ticker) -> tuple[float, int]:
    method, params = spec.method(), spec.params(max_new_tokens)
    tick.step(f"{spec.label}: prepare")
    start, handed_s = time.perf_counter(), 0.0
    if method.has_prepare:
        # held per step, so another user's Compare waits for one chunk; the time it had the model is not ours
        with corpus.lm.lock.per_step() as step:
            method.prepare(corpus, params, step)
        handed_s = step.handed_s
    seconds = time.perf_counter() - start - handed_s
    try:
        nbytes = int(method.storage(corpus, params).total)
    except Exception:  # storage accounting must not sink a run; the answers still count
        nbytes = 0
    return seconds, nbytes


def _ask_one(spec: MethodSpec, question: Question, corpus, max_new_tokens: int) -> dict:
    method, params = spec.method(), spec.params(max_new_tokens)
    out: dict = {"answered": False}
    if spec.answers:
        try:
            with corpus.lm.lock:
                result = method.answer(question.question, corpus, params, None)
            if result.retrieve_s > 0:
                result.notes.append(corpus.retriever_note)
        except NotSupported as exc:
            result = Result(spec.name, error=str(exc))
        except Exception as exc:  # one broken method must not lose the whole run; it is reported
            result = Result(spec.name, error=f"{type(exc).__name__}: {exc}")
            result.notes.append(traceback.format_exc(limit=3))
        out.update({k: getattr(result, k) for k in RESULT_FIELDS})
        out.update(answer=result.answer, error=result.error, notes=result.notes, events=len(result.events),
                   sources=[s.get("doc") for s in result.sources][:10], answered=not result.error)
        if not result.error:
            out.update(answer_scores(result.answer, question.answers, question.keywords))
    if question.options:
        out["nll"] = _choices(method, question, corpus, params, out)
    else:
        out["nll"] = _nll(method, question, corpus, params, out)
    return out


def _choices(method, question: Question, corpus, params, out: dict) -> float:
    """Score every option (into out["choices"]); returns the gold option's NLL, which is the gold answer's (its
    text is answers[0]), so value kept needs no extra forward."""
    try:
        scores = score_options(method, question.question, question.options, question.gold, corpus, params)
    except Exception as exc:  # noqa: BLE001 - recorded; the summary's accuracy leaves this question out
        out["nll_error"] = f"{type(exc).__name__}: {exc}"
        return float("nan")
    out["choices"] = scores.to_dict()
    return scores.nll[question.gold]


def _nll(method, question: Question, corpus, params, out: dict) -> float:
    try:
        with corpus.lm.lock:
            return float(method.nll(question.question, question.answers[0], corpus, params))
    except Exception as exc:  # noqa: BLE001 - recorded, and the summary shows NLL as missing
        out["nll_error"] = f"{type(exc).__name__}: {exc}"
        return float("nan")


def machine_info() -> dict:
    import torch

    gib = memory_gib()
    mem = f"{gib:.0f} GiB" if gib is not None else ""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "memory": mem,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def available_methods() -> list[str]:
    return list(registry())


ProgressCallback = Callable[[float, str], None]
