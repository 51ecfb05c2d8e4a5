"""bench-scaling's run: both ladders in a temporary store, every size prepared, warmed and asked with the methods
in rotated order, each size's record (bench/scaling.py) printed as it is measured."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import UserError
from .scaling import (CEILINGS, DEFAULT_METHODS, MAX_NEW_TOKENS, REFERENCE, ScalingPlan, rung_record, rung_text,
                      summary_text)


def _say(line: str) -> None:
    print(line, flush=True)


def run_scaling_bench(bench, plan: ScalingPlan = ScalingPlan(), methods: str = DEFAULT_METHODS, progress=None) -> dict:
    """Both ladders in a temporary store; returns the record (`scaling_record`) that scaling.json holds."""
    import torch

    from ..machine import load_average
    from .datasets import FACTS
    from .scratch import scratch_workbench

    if not plan.ks and not plan.documents:
        raise UserError("bench-scaling: nothing to measure (both ladders are empty)")
    if not 1 <= plan.facts <= len(FACTS):
        raise UserError(f"bench-scaling: --facts is between 1 and {len(FACTS)} (the made-up facts there are)")
    lm = bench.models.lm
    specs = _specs(methods)
    started, load_start = time.perf_counter(), load_average()
    _say(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, load average "
         f"{(load_start or ['?'])[0]}; model {lm.model_id} in {str(lm.dtype).replace('torch.', '')}")
    rungs = []
    steps = len(plan.ks) + len(plan.documents)
    with scratch_workbench(bench.settings, "scaling") as temp:
        squad = _squad_collection(temp, plan)
        if plan.ks and max(plan.ks) > squad.chunks:
            raise UserError(f"bench-scaling: k={max(plan.ks)} is more than the {squad.chunks} chunks of "
                            f"{squad.description}")
        for index, k in enumerate(plan.ks):
            _tick(progress, index, steps, f"retrieved k={k}")
            rungs.append(measure_rung(temp, squad, "retrieved", k, k, specs, plan))
        for index, tokens in enumerate(plan.documents):
            _tick(progress, len(plan.ks) + index, steps, f"document of {tokens} tokens")
            document = _document_collection(temp, tokens, plan)
            rungs.append(measure_rung(temp, document, "document", tokens, document.chunks, specs, plan))
    record = {"methods": [s.label for s in specs], "reference": REFERENCE, "rungs": rungs, "ceilings": CEILINGS,
              "model": lm.model_id, "dtype": str(lm.dtype).replace("torch.", ""), "load_start": load_start,
              "load_end": load_average(), "wall_s": round(time.perf_counter() - started, 1),
              "plan": {"ks": list(plan.ks), "documents": list(plan.documents), "questions": plan.questions,
                       "articles": plan.articles, "facts": plan.facts}}
    _say(summary_text(record))
    return record


def _tick(progress, index: int, count: int, message: str) -> None:
    if progress:
        progress(index / count, message)


def _specs(methods: str):
    from .specs import parse_method_specs

    specs = parse_method_specs(methods)
    if not any(s.label == REFERENCE for s in specs):
        raise UserError(f"bench-scaling compares with {REFERENCE!r}: put it in --methods")
    return [s for s in specs if s.label == REFERENCE] + [s for s in specs if s.label != REFERENCE]


@dataclass
class Collection:
    """One collection of the ladders: its name, the questions asked over it, and its number of chunks."""

    name: str
    description: str
    questions: list  # datasets.Question
    chunks: int


def _squad_collection(temp, plan: ScalingPlan) -> Collection:
    from .datasets import load_squad

    data = load_squad(n=plan.questions, seed=0, articles=plan.articles)
    haystack = data.haystacks[0]
    return _filled(temp, "scaling-squad", haystack.documents, haystack.questions, data.description)


def _document_collection(temp, tokens: int, plan: ScalingPlan) -> Collection:
    """One essay document of about `tokens` tokens with `plan.facts` made-up facts spread through it: the
    answers are only there, and every method reads the whole document."""
    from .datasets import FACTS, Question, essay_text, needles_haystack

    facts = FACTS[: plan.facts]
    depths = [100 * (i + 0.5) / len(facts) for i in range(len(facts))]
    text = needles_haystack(temp.models.lm.tokenizer, essay_text(), tokens, [(f.sentence, d) for f, d in zip(facts, depths)])
    questions = [Question(f"fact{i}", f.question, [f.answer], meta={"depth": d})
                 for i, (f, d) in enumerate(zip(facts, depths))]
    description = (f"one document of {tokens:,} tokens (Paul Graham essays with {len(facts)} made-up facts at depths "
                   f"{', '.join(f'{d:.0f}%' for d in depths)}), every chunk read")
    return _filled(temp, f"scaling-doc-{tokens}", [(f"essays-{tokens}.txt", text)], questions, description)


def _filled(temp, name: str, documents, questions, description: str) -> Collection:
    reports = temp.ingest([(doc, text.encode("utf-8")) for doc, text in documents], name)
    failed = [r.message for r in reports if r.status == "error"]
    if failed:
        raise UserError(f"could not ingest the scaling documents: {failed[0]}")
    corpus = temp.corpus(name, create=False)
    return Collection(name, description, questions, len(corpus.chunks()))


def measure_rung(temp, collection: Collection, ladder: str, size: int, k: int, specs, plan: ScalingPlan) -> dict:
    """One size of a ladder: prepare (untimed), warm, one untimed answer per method, then every question with the
    methods in rotated order; the ceilings' parts and every method's value kept from the same answers."""
    from ..methods import get_method
    from ..methods.base import params_from
    from .order import rotated
    from .ttft import ModelClock, Row, question_prefill, timed_answer

    corpus = temp.corpus(collection.name, create=False)
    _check_window(corpus, collection, k)
    rows = [Row(spec.label, spec.name, {**spec.knobs, **plan.overrides.get(spec.name, {}), "k": k}) for spec in specs]
    prepared = time.perf_counter()
    for row in rows:
        if get_method(row.method).has_prepare:
            temp.prepare([row.method], collection.name, {row.method: row.knobs})
    prepare_s = time.perf_counter() - prepared
    temp.warm(collection.name)
    questions = [q.question for q in collection.questions]
    clock = ModelClock(corpus.lm)
    try:
        for row in rows:  # warm-up: one untimed answer each (its shapes, its caches' first read)
            timed_answer(row, questions[0], corpus, clock, params_from, get_method, keep=False)
        for index, question in enumerate(questions):
            for row in rotated(rows, index):
                timed_answer(row, question, corpus, clock, params_from, get_method)
    finally:
        clock.close()
    floor_s, question_tokens = question_prefill(corpus.lm, questions)
    nlls = _gold_nlls(corpus, rows, collection.questions)
    rung = rung_record(ladder, size, k, collection, rows, nlls, floor_s, question_tokens, prepare_s)
    _say(rung_text(rung))
    return rung


def _check_window(corpus, collection: Collection, k: int) -> None:
    """Every method must read the same tokens: a prompt the model window cannot hold is an error, not a cut."""
    from ..methods import get_method
    from ..methods.base import params_from

    rag = get_method(REFERENCE)
    longest = max(len(rag.build(q.question, corpus, params_from(rag.Params, {"k": k}))[0]) for q in collection.questions)
    room = corpus.lm.window - MAX_NEW_TOKENS
    if longest > room:
        raise UserError(f"{collection.description}: RAG's prompt is {longest} tokens, more than the model's window "
                        f"leaves ({room}); use smaller --documents or --ks")


def _gold_nlls(corpus, rows, questions) -> dict[str, list[float]]:
    """Each row's (and closed book's) teacher-forced NLL of every question's gold answer: value kept's parts."""
    from ..methods import get_method
    from ..methods.base import params_from

    out = {}
    for label, name, knobs in [("closed_book", "closed_book", {})] + [(r.label, r.method, r.knobs) for r in rows]:
        method = get_method(name)
        params = params_from(method.Params, knobs)
        out[label] = [float(method.nll(q.question, q.answers[0], corpus, params)) for q in questions]
    return out
