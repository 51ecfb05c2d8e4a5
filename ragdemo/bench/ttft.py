"""bench-speed's method section, and what bench-scaling reuses: each answer's TTFT split into retrieval, loading,
the model's part (`ModelClock`: first embedding lookup to first vocabulary projection), the first token and the
rest, per method configuration (`Row`), with the ceiling each method could reach if only the model counted."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..units import fmt_ratio
from .order import rotated


def _say(line: str) -> None:
    print(line, flush=True)


SPEED_COLLECTION = "speed-squad"


@dataclass
class Row:
    """One method configuration: knobs, whether its LoRA is on, and the per-answer figures (medians)."""

    label: str
    method: str
    knobs: dict
    lora: bool = False
    results: list = field(default_factory=list)  # (Result, model seconds before the first token, first-token seconds)

    def median(self, part: str) -> float:
        return float(np.median([_part(r, model_s, first_s, part) for r, model_s, first_s in self.results]))

    def mean(self, attribute: str) -> float:
        return float(np.mean([getattr(r, attribute) for r, _, _ in self.results]))


def _part(result, model_s: float, first_s: float, part: str) -> float:
    """One component of TTFT; `overhead` is what the clock saw outside retrieval, loading and the model."""
    if part == "ttft":
        return result.ttft_s
    if part == "prefill":
        return model_s
    if part == "first":
        return first_s
    if part == "overhead":
        return result.ttft_s - result.retrieve_s - result.load_s - model_s - first_s
    return getattr(result, f"{part}_s")


class ModelClock:
    """Times the model's part of an answer: from the LM's first embedding lookup to the end of its first
    vocabulary projection (the logits the first token is drawn from). Hooks only read the clock."""

    def __init__(self, lm):
        self.start = self.end = None
        inner = lm.model.model
        self.handles = [inner.embed_tokens.register_forward_pre_hook(self._started),
                        lm.model.lm_head.register_forward_hook(self._ended)]

    def _started(self, *_):
        if self.start is None:
            self.start = time.perf_counter()

    def _ended(self, *_):
        if self.start is not None and self.end is None:
            self.end = time.perf_counter()

    def reset(self) -> None:
        self.start = self.end = None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def method_rows(n_layers: int, quick: bool) -> list[Row]:
    """RAG, BTR at split 6 and 18 (scaled to the model's depth when it has fewer than 30 layers) and LLoCO c=4,
    each with the LoRA off and on."""
    rows = [Row("rag k=5", "rag", {"k": 5})]
    for split in (6, 18):
        depth = split if n_layers >= 30 else max(1, min(n_layers - 1, round(split * n_layers / 30)))
        knobs = {"k": 5, "split": depth, "bits": 1, "calibrate": True}
        rows += [Row(f"btr split={depth} 1 bit, LoRA off", "btr", {**knobs, "lora": False}),
                 Row(f"btr split={depth} 1 bit, LoRA on", "btr", {**knobs, "lora": True}, lora=True)]
    knobs = {"k": 5, "c": 4}
    rows += [Row("lloco c=4, LoRA off", "lloco", {**knobs, "lora": False}),
             Row("lloco c=4, LoRA on", "lloco", {**knobs, "lora": True}, lora=True)]
    return rows


def bench_methods(temp, quick: bool = False) -> tuple[list[Row], float]:
    """Per-answer TTFT breakdown of RAG, BTR and LLoCO over a 2-article SQuAD collection in the temporary store,
    after preparation, adapter training and a warm-up answer per configuration; questions interleave methods,
    each question starting at the next configuration (`rotated`)."""
    from ..bench.datasets import load_squad
    from ..methods import get_method
    from ..methods.base import params_from

    dataset = load_squad(n=2 if quick else 10, seed=0, articles=1 if quick else 2)
    haystack = dataset.haystacks[0]
    temp.ingest([(name, text.encode()) for name, text in haystack.documents], SPEED_COLLECTION)
    corpus = temp.corpus(SPEED_COLLECTION, create=False)
    lm = corpus.lm
    steps = 2 if quick else 20
    rows = method_rows(lm.n_layers, quick)
    _say(f"methods: {dataset.description}; {corpus.n_tokens()} collection tokens; the LoRA rows use an adapter "
         f"trained here for timing only ({steps} steps, lora_steps={steps}; its answers' quality is not measured)")
    started = time.perf_counter()
    for row in rows:
        knobs = {**row.knobs, "lora_steps": steps} if row.method != "rag" else row.knobs
        row.knobs = knobs
        if get_method(row.method).has_prepare:
            temp.prepare([row.method], SPEED_COLLECTION, {row.method: knobs})
        if row.lora:
            temp.finetune(row.method, SPEED_COLLECTION, {row.method: knobs})
    _say(f"methods: prepared and trained in {time.perf_counter() - started:.0f} s (not part of any figure below)")
    temp.warm(SPEED_COLLECTION)
    clock = ModelClock(lm)
    try:
        for row in rows:  # warm-up: one untimed answer per configuration (adapter loaded, prefix cached)
            timed_answer(row, "What is this about?", corpus, clock, params_from, get_method, keep=False)
        for index, question in enumerate(haystack.questions):
            for row in rotated(rows, index):
                timed_answer(row, question.question, corpus, clock, params_from, get_method)
    finally:
        clock.close()
    floor = question_floor(lm, [q.question for q in haystack.questions], rows[0].median("prefill"))
    report_methods(rows, floor)
    return rows, floor


def question_floor(lm, questions: list[str], rag_prefill_s: float) -> float:
    """LLoCO's measured limit: the question segment (what LLoCO prefills) run alone, with no context at all.
    RAG's prefill over that is the speed-up LLoCO would reach if reading and attending to its caches were free;
    short prefills cost more per token than long ones (weights are streamed once per forward), so this is
    lower than the token-count ceiling."""
    floor, tokens = question_prefill(lm, questions)
    _say(f"question alone (LLoCO's floor): {tokens:.0f} tokens, no context, prefill {1000 * floor:.1f} ms "
         f"median; RAG's prefill / that = {rag_prefill_s / floor:.2f}x, the most LLoCO's prefill could gain")
    return floor


def question_prefill(lm, questions: list[str]) -> tuple[float, float]:
    """(median seconds, median tokens) of the question segment's prefill alone, no context, last logits only;
    each timed after one untimed call (the first call of a shape picks its kernels)."""
    from ..engine.layers import forward_all
    from ..engine.prompt import build_prompt

    times, lengths = [], []
    with torch.inference_mode():
        for question in questions:
            ids = build_prompt(lm.tokenizer, question, [{"text": "."}]).segments[-1].ids
            forward_all(lm, torch.tensor([ids], device=lm.device), last_only=True)  # first call: kernel choice
            started = time.perf_counter()
            forward_all(lm, torch.tensor([ids], device=lm.device), last_only=True)
            times.append(time.perf_counter() - started)
            lengths.append(len(ids))
    return float(np.median(times)), float(np.median(lengths))


def timed_answer(row: Row, question: str, corpus, clock: ModelClock, params_from, get_method, keep: bool = True):
    method = get_method(row.method)
    params = params_from(method.Params, {**row.knobs, "max_new_tokens": 2})
    tokens = []
    clock.reset()
    called = time.perf_counter()
    result = method.answer(question, corpus, params, tokens.append)
    if result.error:
        raise RuntimeError(f"{row.label}: {result.error}")
    if row.lora and not any("LoRA" in note for note in result.notes):
        raise RuntimeError(f"{row.label}: the answer did not use the trained adapter")
    if keep:
        first_token_at = called + result.prepare_s + result.ttft_s
        model_s = clock.end - clock.start
        row.results.append((result, model_s, max(0.0, first_token_at - clock.end)))


def ceiling(row: Row, rag: Row, question_floor_s: float) -> float:
    """The most `row` could gain over RAG if only the model counted. BTR: RAG's token-layers computed at query
    time over the method's (query side plus passage tokens above the split). LLoCO: RAG's prefill over the
    question's prefill alone, timed: its token count (~15x) assumes cost per token, but a short forward costs
    what streaming every weight once costs, so the timed floor is the limit."""
    if row.method == "lloco":
        return rag.median("prefill") / question_floor_s
    return rag.mean("processed_tokens") / max(row.mean("processed_tokens"), 1e-9)


def report_methods(rows: list[Row], question_floor_s: float) -> None:
    rag = rows[0]
    rag_ttft = rag.median("ttft")
    _say(f"per-answer TTFT breakdown, medians over {len(rag.results)} questions (ms); vs RAG = RAG TTFT / TTFT in "
         "this run; ceiling = what TTFT could reach if only the model counted: BTR, RAG's token-layers computed at "
         "query time / the method's (query side + passage tokens above the split); LLoCO, RAG's prefill / the "
         "question's prefill alone (the line above)")
    _say(f"{'configuration':<30} {'TTFT':>7} {'retrieve':>8} {'load':>6} {'prefill':>7} {'1st tok':>7} "
         f"{'overhead':>8} {'vs RAG':>12} {'ceiling':>7}")
    for row in rows:
        ms = {part: 1000 * row.median(part) for part in ("ttft", "retrieve", "load", "prefill", "first", "overhead")}
        _say(f"{row.label:<30} {ms['ttft']:7.1f} {ms['retrieve']:8.1f} {ms['load']:6.1f} {ms['prefill']:7.1f} "
             f"{ms['first']:7.1f} {ms['overhead']:8.1f} {fmt_ratio(rag_ttft / row.median('ttft')):>12} "
             f"{ceiling(row, rag, question_floor_s):6.2f}x")

