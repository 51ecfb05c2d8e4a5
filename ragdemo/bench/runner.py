"""The benchmark runner: fresh collection(s), every question asked with every chosen method, metrics, outputs.

For each question and method it records the generated answer's EM / F1 / contains and its timing and token
counts from `Method.answer`, and the teacher-forced NLL of the first gold answer from `Method.nll`. Closed
book's NLL and the reference's NLL are always computed, so "context value kept" can be reported for every
method against a reference that is named in the output. A multiple-choice question is also scored option by
option through the same `Method.nll` (bench/choices.py): accuracy and length-normalised accuracy.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import DEFAULT_MAX_NEW_TOKENS  # one default shared with Ask and the CLI
from ..errors import NotSupported, UserError
from ..methods import get_method, registry
from ..methods.base import Progress, Result, check_on_model, params_from
from .datasets import Dataset, Haystack, Question
from ..units import fmt_bytes, fmt_s, fmt_speed
from .choices import MEASURES as CHOICE_MEASURES, accuracy_interval, score_options
from .metrics import (BOOTSTRAP_SAMPLES, INDICATIVE_BELOW, MIN_MEAN_GAP, MIN_QUESTION_GAP, Interval, answer_scores,
                      disagreement, median_value_kept, relative_interval, value_kept_interval)

REFERENCES = ("rag", "full_context")
RESULT_FIELDS = ["prompt_tokens", "processed_tokens", "cached_tokens", "overhead_tokens", "new_tokens", "retrieve_s", "load_s", "prepare_s",
                 "ttft_s", "decode_s", "total_s", "decode_tok_s", "storage_bytes", "bytes_per_token", "chunk_bytes_per_token"]


@dataclass
class MethodSpec:
    """One column of the comparison: a registered method with knobs. `btr@bits=1` is labelled "btr@bits=1"."""
    label: str
    name: str
    knobs: dict = field(default_factory=dict)
    limit: int | None = None  # ask only the first `limit` questions (for very slow methods); None = all
    answers: bool = True  # False: NLL only (closed book / reference added for context value kept)

    def method(self):
        return get_method(self.name)

    def params(self, max_new_tokens: int):
        return params_from(self.method().Params, {"max_new_tokens": max_new_tokens, **self.knobs})


def parse_method_specs(text: str | list[str] | None, knobs: dict[str, dict] | None = None,
                       default: tuple[str, ...] = ("closed_book", "full_context", "rag")) -> list[MethodSpec]:
    """`rag,btr@bits=1,btr@bits=8@k=6` -> specs; `--set btr.k=6` knobs apply to every variant of btr
    (a variant's own knobs win)."""
    items = text.split(",") if isinstance(text, str) else (text or list(default))
    specs, labels = [], set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, *pairs = item.split("@")
        method = get_method(name.strip())
        variant = {}
        for pair in pairs:
            knob, sep, value = pair.partition("=")
            if not sep or not knob.strip():
                raise UserError(f"method variant {item!r}: use METHOD@KNOB=VALUE[@KNOB=VALUE]")
            variant[knob.strip()] = value.strip()
        merged = {**(knobs or {}).get(method.name, {}), **variant}
        _check_knobs(method, merged, item)
        if item in labels:
            raise UserError(f"method {item!r} is listed twice")
        labels.add(item)
        specs.append(MethodSpec(item, method.name, merged))
    if not specs:
        raise UserError("no methods given")
    return specs


def _check_knobs(method, knobs: dict, label: str) -> None:
    """The knobs' declared bounds and choices, as everywhere else; the message starts with the variant's label."""
    try:
        params_from(method.Params, knobs, method.name)
    except UserError as exc:
        raise UserError(f"{label}: {exc}") from None


def check_specs_on_model(specs: list[MethodSpec], lm, max_new_tokens: int) -> None:
    """The rules that need the model (e.g. a layer split deeper than its layers), before the first question."""
    for spec in specs:
        try:
            check_on_model(spec.method(), spec.params(max_new_tokens), lm)
        except UserError as exc:
            raise UserError(f"{spec.label}: {exc}") from None


def apply_limits(specs: list[MethodSpec], limits: dict[str, int] | None) -> None:
    for label, limit in (limits or {}).items():
        matched = [s for s in specs if s.label == label or s.name == label]
        if not matched:
            raise UserError(f"--limit {label}: no such method in --methods")
        for spec in matched:
            spec.limit = int(limit)


def with_baselines(specs: list[MethodSpec], reference: str, knobs: dict | None) -> tuple[list[MethodSpec], str]:
    """Make sure closed book (NLL at least) and the reference (answered, for TTFT ratios) are in the run."""
    if reference not in REFERENCES and reference not in [s.label for s in specs]:
        raise UserError(f"--reference must be one of {', '.join(REFERENCES)} or a label in --methods")
    specs = list(specs)
    if not any(s.label == reference for s in specs):
        ref_name = reference.split("@")[0]
        specs.append(MethodSpec(reference, ref_name, dict((knobs or {}).get(ref_name, {}))))
    if not any(s.label == "closed_book" for s in specs):
        specs.insert(0, MethodSpec("closed_book", "closed_book", answers=False))
    return specs, reference


# ------------------------------------------------------------------ running
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


def rotated(specs: list[MethodSpec], index: int) -> list[MethodSpec]:
    """The methods in a different order for each question (as bench-speed does), so no method always runs first
    after a question change and pays the colder retrieval."""
    shift = index % len(specs) if specs else 0
    return specs[shift:] + specs[:shift]


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
    collection_id = store.collection_id(collection)
    with store.transaction():
        store.db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))


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


# ------------------------------------------------------------------ summary
SUMMARY_COLUMNS = ["method", "n", "errors", "em", "f1", "contains", "keywords", "acc", "acc_norm", "nll", "value_kept",
                   "contains_vs_ref", "f1_vs_ref", "value_kept_median", "value_kept_n", "ttft_s", "speedup", "total_s",
                   "prompt_tokens", "processed_tokens", "cached_tokens", "bytes_per_token", "storage_bytes", "prepare_s"]


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    return float(np.mean(values)) if values else float("nan")


def summarize(run: BenchRun) -> list[dict]:
    ref = run.meta["reference"]
    return [_summary_row(run, spec, ref) for spec in run.specs]


def _summary_row(run: BenchRun, spec: MethodSpec, ref: str) -> dict:
    mine = [r for r in run.records if spec.label in r["results"]]
    answered = [r["results"][spec.label] for r in mine if r["results"][spec.label].get("answered")]
    triples = [(r["results"]["closed_book"]["nll"], r["results"][spec.label]["nll"], r["results"][ref]["nll"])
               for r in mine if "closed_book" in r["results"] and ref in r["results"]]
    median, median_n = median_value_kept(triples)
    value = value_kept_interval(*(list(x) for x in zip(*triples))) if triples else Interval(*[float("nan")] * 3)
    row = {"method": spec.label, "n": len(mine),
           "errors": sum(1 for r in mine if r["results"][spec.label].get("error")) if spec.answers else 0,
           "nll": _mean(r["results"][spec.label]["nll"] for r in mine),
           "value_kept": value.value, "value_kept_interval": value.to_dict(),
           "value_kept_median": median, "value_kept_n": median_n,
           "indicative": len(triples) < INDICATIVE_BELOW,
           "storage_bytes": _mean(run.storage.get(spec.label, [])),
           "prepare_s": run.prepare_s.get(spec.label, 0.0)}
    for key in ("em", "f1", "contains", "keywords"):
        row[key] = 100 * _mean(a.get(key) for a in answered) if spec.answers else float("nan")
    for key in ("ttft_s", "total_s", "prompt_tokens", "processed_tokens", "cached_tokens", "overhead_tokens",
                "bytes_per_token"):
        row[key] = _mean(a.get(key) for a in answered) if spec.answers else float("nan")
    ratio = _ttft_ratio(run.records, spec.label, ref) if spec.answers else float("nan")
    row["ttft_vs_ref"] = ratio  # this TTFT / the reference's (JSON); screens say it as `speedup` in words
    row["speedup"] = 1 / ratio if ratio and np.isfinite(ratio) else float("nan")
    answers = _relative(run.records, spec, ref, "contains") if spec.answers else Interval(*[float("nan")] * 3)
    row["contains_vs_ref"], row["contains_vs_ref_interval"] = answers.value, answers.to_dict()
    f1 = _relative(run.records, spec, ref, "f1") if spec.answers else Interval(*[float("nan")] * 3)
    row["f1_vs_ref"], row["f1_vs_ref_interval"] = f1.value, f1.to_dict()
    row["disagreement"] = disagreement(value, answers, ref.upper() if ref == "rag" else ref) if spec.label != ref else ""
    row.update(_choice_scores(mine, spec.label))
    return row


def _choice_scores(records: list[dict], label: str) -> dict:
    """Multiple-choice accuracy and acc_norm with their intervals, over the questions whose options were scored."""
    scored = [r["results"][label]["choices"] for r in records if "choices" in r["results"][label]]
    out = {}
    for measure in CHOICE_MEASURES:
        interval = accuracy_interval([c[measure] for c in scored])
        out[measure], out[f"{measure}_interval"] = interval.value, interval.to_dict()
    out["choices_n"] = len(scored)
    return out


def _relative(records: list[dict], spec: MethodSpec, ref: str, score: str) -> Interval:
    """A score of this method's answers over the reference's, on the questions both answered, with its interval."""
    pairs = [(r["results"][spec.label].get(score), r["results"][ref].get(score)) for r in records
             if r["results"].get(spec.label, {}).get("answered") and r["results"].get(ref, {}).get("answered")]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return Interval(*[float("nan")] * 3)
    mine, theirs = zip(*pairs)
    return relative_interval(mine, theirs)


def interval_of(row: dict, key: str) -> Interval:
    """A summary row's interval (`value_kept`, `contains_vs_ref`, `f1_vs_ref`) as an Interval."""
    found = row.get(f"{key}_interval") or {}
    nan = float("nan")
    return Interval(float(found.get("value", row.get(key, nan))), float(found.get("low", nan)),
                    float(found.get("high", nan)))


def _ttft_ratio(records: list[dict], label: str, ref: str) -> float:
    """Mean TTFT over mean reference TTFT, over only the questions both answered (with --limit, a method asked
    the first 20 questions is compared with the reference on those 20, not on all)."""
    pairs = [(r["results"][label]["ttft_s"], r["results"][ref]["ttft_s"]) for r in records
             if r["results"].get(label, {}).get("answered") and r["results"].get(ref, {}).get("answered")]
    if not pairs:
        return float("nan")
    mine, theirs = _mean(p[0] for p in pairs), _mean(p[1] for p in pairs)
    return mine / theirs if theirs > 0 else float("nan")


def machine_info() -> dict:
    import torch

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "memory": mem,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


# ------------------------------------------------------------------ writing
def reference_name(run_or_meta) -> str:
    ref = (run_or_meta.meta if hasattr(run_or_meta, "meta") else run_or_meta).get("reference", "rag")
    return "RAG" if ref == "rag" else ref


def fmt_cell(row: dict, key: str, reference: str = "RAG") -> str:
    """One summary cell as every table shows it (the bench's summary.md, the Benchmark tab, cards, README)."""
    value = row.get(key)
    if key in ("value_kept", "contains_vs_ref", "f1_vs_ref", "acc", "acc_norm"):
        return interval_of(row, key).text()
    if key == "speedup":
        return fmt_speed(value, reference)
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "value_kept_median":
        return f"{100 * value:.0f}%"
    if key in ("em", "contains", "keywords"):
        return f"{value:.0f}%"
    if key == "bytes_per_token":
        return f"{value:,.1f} B"
    if key in ("ttft_s", "total_s"):
        return fmt_s(value)
    if key == "nll":
        return f"{value:.3f}"
    if key == "storage_bytes":
        return fmt_bytes(value)
    if key in ("prompt_tokens", "n", "errors", "value_kept_n"):
        return f"{value:,.0f}"
    if key == "prepare_s":
        return f"{value:.1f}"
    return f"{value:.1f}"


MD_HEADERS = {"method": "method", "n": "n", "errors": "errors", "em": "EM", "f1": "F1", "contains": "contains",
              "keywords": "keywords", "acc": "MC acc [95% CI]", "acc_norm": "MC acc_norm [95% CI]",
              "nll": "gold NLL", "value_kept": "value kept [95% CI]",
              "contains_vs_ref": "contains vs ref [95% CI]", "f1_vs_ref": "F1 vs ref [95% CI]",
              "value_kept_median": "value kept (median)", "value_kept_n": "median over n", "ttft_s": "TTFT",
              "speedup": "TTFT vs ref", "total_s": "total", "prompt_tokens": "prompt tok",
              "processed_tokens": "processed tok", "cached_tokens": "cached tok", "bytes_per_token": "bytes/tok",
              "storage_bytes": "stored", "prepare_s": "prepare s"}


def column_header(key: str, reference: str = "RAG") -> str:
    return MD_HEADERS[key].replace("vs ref", f"vs {reference}")


def summary_columns(run: BenchRun) -> list[str]:
    """Every summary column, without those the run has nothing for (keyword recall, multiple choice)."""
    absent = set() if any(r.get("keywords") for r in run.records) else {"keywords"}
    absent |= set() if has_choices(run) else set(CHOICE_MEASURES)
    return [c for c in SUMMARY_COLUMNS if c not in absent]


def has_choices(run: BenchRun) -> bool:
    return any(r.get("options") for r in run.records)


def row_label(run: BenchRun, row: dict) -> str:
    label = row["method"] + ("" if _spec(run, row["method"]).answers else " (NLL only)")
    return label + (" (indicative: < %d questions)" % INDICATIVE_BELOW if row.get("indicative") else "")


def summary_markdown_table(run: BenchRun) -> str:
    cols, reference = summary_columns(run), reference_name(run)
    lines = ["| " + " | ".join(column_header(c, reference) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in run.summary:
        lines.append("| " + " | ".join(row_label(run, row) if c == "method" else fmt_cell(row, c, reference)
                                       for c in cols) + " |")
    return "\n".join(lines)


def _spec(run: BenchRun, label: str) -> MethodSpec:
    return next(s for s in run.specs if s.label == label)


def disagreements(run: BenchRun) -> list[str]:
    return [f"{row['method']}: {row['disagreement']}" for row in run.summary if row.get("disagreement")]


def summary_markdown(run: BenchRun) -> str:
    m = run.meta
    machine = m["machine"]
    reference = reference_name(run)
    lines = [f"# Benchmark: {m['dataset']}", "",
             f"- data: {m['description']}",
             f"- model: {m['model']} ({m['dtype']}, {m['device']}), max new tokens {m['max_new_tokens']}",
             f"- machine: {machine['cores']} cores, {machine['memory']}, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), {machine['platform']}",
             f"- date: {m['date']}, wall time {m['seconds']:.0f} s"]
    if m.get("attention"):
        lines.insert(4, f"- attention: {m['attention']}")
    if m.get("command"):
        lines.append(f"- command: `{m['command']}`")
    lines += [f"- reference for context value kept and TTFT ratio: **{m['reference']}**",
              "- method order: rotated from question to question"]
    if m.get("partial"):
        lines.append(f"- **{m['partial']}**")
    lines.append("")
    lines += [summary_markdown_table(run), ""]
    found = disagreements(run)
    if found:
        lines += ["**Where the two quality signals disagree:**", ""] + [f"- {line}" for line in found] + [""]
    lines += ["EM / F1 / contains are percentages over answered questions (SQuAD normalisation, best over the gold "
              "answers; contains = a normalised gold answer appears as whole words in the normalised answer). "
              "Gold NLL is the mean teacher-forced NLL per token of the first gold answer.",
              f"**Value kept** = Σ(NLL_closed_book − NLL_method) / Σ(NLL_closed_book − NLL_{m['reference']}) over "
              "the same questions: a ratio of summed gaps, stable where per-question ratios explode; \"–\" (n/a) when "
              f"the reference beats closed book by less than {MIN_MEAN_GAP} nats per token on average. "
              f"**Contains / F1 vs {reference}** = the method's mean over the reference's on the questions both "
              "answered. [low, high] = 95% paired bootstrap interval (questions resampled, method and reference "
              f"together, {BOOTSTRAP_SAMPLES:,} times). The median of "
              f"per-question ratios is taken over the questions where the reference beats closed book by at least "
              f"{MIN_QUESTION_GAP} nats (their count is shown). Rows on fewer than {INDICATIVE_BELOW} questions are "
              f"indicative only. TTFT vs {reference} = the reference's mean TTFT over this method's, on the questions "
              "both answered.",
              "Stored = each method's artifacts for the collection, everything counted (mean per collection); "
              "bytes/tok = that over the collection's tokens. \"NLL only\" rows were added to score context value kept."]
    if has_choices(run):
        lines.append(f"**MC acc** = the share of multiple-choice questions where the option with the highest "
                     "log-likelihood as the answer (summed over its tokens, given the question and the context the "
                     "method reads, through its own NLL path) is the gold one; **MC acc_norm** divides each option's "
                     "log-likelihood by its length in characters first (lm-evaluation-harness's acc and acc_norm). "
                     f"[low, high] = 95% bootstrap interval over questions ({BOOTSTRAP_SAMPLES:,} resamples, the same "
                     "draws for every method). EM / F1 / contains score the generated answer against the gold option.")
    limited = [s for s in run.specs if s.limit]
    if limited:
        lines.append("Methods limited to the first questions (too slow for all): " +
                     ", ".join(f"{s.label} ({s.limit})" for s in limited) + "; their value kept uses the same questions.")
    errors = [(r["id"], label, res["error"]) for r in run.records for label, res in r["results"].items() if res.get("error")]
    if errors:
        lines += ["", f"{len(errors)} answers failed; first: {errors[0][1]} on {errors[0][0]}: {errors[0][2][:200]}"]
    grid = needle_grids(run)
    if grid:
        lines += ["", "## Needle grid (contains / keyword recall %, rows = context tokens, columns = depth %)", "", grid]
    return "\n".join(lines) + "\n"


def needle_grids(run: BenchRun) -> str:
    cells = [r for r in run.records if "length" in r["meta"] and "depth" in r["meta"]]
    if not cells:
        return ""
    lengths = sorted({r["meta"]["length"] for r in cells})
    depths = sorted({r["meta"]["depth"] for r in cells})
    out = []
    for spec in run.specs:
        if not spec.answers:
            continue
        out += [f"**{spec.label}**", "", "| tokens | " + " | ".join(f"{d:g}%" for d in depths) + " |",
                "|---|" + "---|" * len(depths)]
        for length in lengths:
            row = []
            for depth in depths:
                res = [r["results"].get(spec.label, {}) for r in cells
                       if r["meta"]["length"] == length and r["meta"]["depth"] == depth]
                row.append(" ".join(_cell(x) for x in res) or "–")
            out.append(f"| {length} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _cell(res: dict) -> str:
    if not res.get("answered"):
        return "err" if res.get("error") else "–"
    return f"{100 * res.get('contains', 0):.0f} / {100 * res.get('keywords', 0):.0f}"


def write_outputs(run: BenchRun, out: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    results = out / "results.json"
    results.write_text(json.dumps({"meta": run.meta, "summary": run.summary, "storage": run.storage,
                                   "questions": run.records}, indent=1, default=_json_default, allow_nan=True))
    cols = summary_columns(run)
    csv = out / "summary.csv"
    csv.write_text(",".join(cols) + "\n" + "\n".join(
        ",".join(_csv(row[c]) for c in cols) for row in run.summary) + "\n")
    md = out / "summary.md"
    md.write_text(summary_markdown(run))
    written += [results, csv, md]
    if plots:
        from .plots import make_plots

        written += make_plots(run, out)
    return written


def _csv(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '""') + '"' if ("," in value or '"' in value) else value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}"


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


def load_run(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def load_run_or_summary(path: str | Path) -> dict:
    """A bench run from its output folder or its results.json."""
    path = Path(path)
    return load_run(path / "results.json" if path.is_dir() else path)


def available_methods() -> list[str]:
    return list(registry())


ProgressCallback = Callable[[float, str], None]
