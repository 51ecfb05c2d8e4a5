"""RETRO, training-free (In-Context RALM style): chunk neighbours with their continuations, re-retrieved while
the answer is generated, prepended to an unmodified LM."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..engine.generate import decode_loop, supports_kv_cache
from ..engine.prefix import prefix_cache
from ..engine.prompt import Prompt, build_prompt, encode
from ..engine.scoring import nll_of_answer
from ..errors import NotSupported
from ..store import group_passages
from .base import Method, Params, Result, finish, knob
from .measured import MeasuredRun, measured_run


# The runs the card reports, first found wins: the run at the current defaults (bench output
# `bench_out/issue15_squad`, copied to assets/results/issue15_squad/), then the all-methods SQuAD run.
MEASURED_RUNS = ("issue15_squad/summary.md", "squad_all_summary.md")
MEASURED_COLUMNS = ["method", "n", "F1", "contains", "value kept", "TTFT s", "TTFT vs ref", "total s", "prompt tok",
                    "processed tok"]
# A run's command line names only the knobs it set. The default stride was 64 until this commit time (20fed32)
# made it 16, so a run that did not set it ran at the default of its date.
STRIDE_16_SINCE = "2026-11-23 13:41"


def measured_stride(run: MeasuredRun) -> int:
    given = run.knobs("retro").get("stride")
    if given:
        return int(given)
    return 16 if run.meta.get("date", "") >= STRIDE_16_SINCE else 64


def re_retrieval_sentence(run: MeasuredRun, stride: int) -> str:
    """Whether the run re-retrieved at all: never when answers stop before the first stride; otherwise how
    many answers did, from results.json when it is bundled with the summary."""
    limit = run.max_new_tokens
    if limit is not None and stride >= limit:
        return (f"**No re-retrieval happened in this run:** answers stop at {limit} new tokens, before the first "
                f"re-retrieval at token {stride}, so the row measures RETRO's retrieval at the question only "
                "([N, F] neighbours instead of RAG's top-k chunks).")
    answered = [q["results"]["retro"] for q in run.questions() or [] if q["results"].get("retro", {}).get("answered")]
    if not answered:
        return (f"Answers longer than {stride} tokens re-retrieved; how many is in the run's results.json (not "
                "bundled here).")
    again = sum(1 for r in answered if r.get("events", 0) > 1)  # the first event is the question's retrieval
    return (f"{again} of {len(answered)} answers re-retrieved at least once (every {stride} tokens); the others "
            f"ended before token {stride}.")


def measured_paragraph() -> str:
    run = next(filter(None, map(measured_run, MEASURED_RUNS)), None)
    if run is None:
        return ("**Measured:** not in this checkout (`python -m ragdemo bench --dataset squad --articles 2 --methods "
                "closed_book,rag,retro` writes the table the card shows).")
    stride = measured_stride(run)
    knobs = ", ".join(f"{k}={v}" for k, v in {**run.knobs("retro"), "stride": str(stride)}.items())
    return (f"**Measured** (`{run.relative}`; {run.meta.get('data', '')}; {run.meta.get('model', '')}; "
            f"{run.meta.get('date', '')}; retro at {knobs}, its other knobs at their defaults; "
            f"command {run.meta.get('command', 'not recorded')}):\n\n"
            f"{run.table(['rag', 'retro'], MEASURED_COLUMNS)}\n\n{re_retrieval_sentence(run, stride)}")


@dataclass
class RetroParams(Params):
    k: int = knob(2, "neighbours per query chunk (RETRO's k=2)", label="neighbours", min=1, max=50)
    chunk_tokens: int = knob(64, "query chunk size in LM tokens; also the length of the re-retrieval tail",
                             label="query chunk tokens", min=8, max=512)
    stride: int = knob(16, "re-retrieve every `stride` generated tokens (In-Context RALM: 4-32; RETRO: 64)",
                       label="re-retrieval stride", min=4, max=512)
    continuation: bool = knob(True, "value = [neighbour N, its continuation F]", label="with continuation")


class Retro(Method):
    name = "retro"
    label = "RETRO (in-context)"
    order = 4
    Params = RetroParams
    card = """### RETRO, training-free (Borgeaud et al. 2021, run as In-Context RALM, Ram et al. 2023)
**Database:** the collection's 64-token chunks. Key = the stored all-MiniLM-L6-v2 mean-pooled embedding (RETRO
uses frozen BERT averaged over time); value = [N, F] = the neighbour chunk N plus its continuation F, the next
chunk of the same document.
**Retrieval:** the question is split into `chunk_tokens`-token chunks (LM tokens) and each chunk fetches its k
nearest neighbours by L2 distance (exact FAISS). Neighbours and continuations are joined where they touch and
placed in document order at the front of the context: [instruction][neighbours][question].
**Generation:** every `stride` generated tokens the last `chunk_tokens` tokens (question + answer so far) are
embedded and searched again. New neighbours *replace* the old ones at the front, and the context
[instruction][new neighbours][question][answer so far] is prefilled again (the KV cache is kept up to the
first token that differs). When the neighbours did not change the cache is kept as it is. Every retrieval is an
entry in the result's events (step, query, chunk ids, changed or not, what was recomputed).
**Causality:** a retrieval made after token t is only seen by tokens t+1 onwards; nothing generated earlier
can see it.
**What the model sees:** neighbours from the question's retrieval are marked *text* (read at prefill, like
RAG); neighbours swapped in by a re-retrieval during generation are marked *retrieved*. The view shows the
context in use when the answer finished.
**Exact vs approximated:** real RETRO feeds neighbours through chunked cross-attention in a model trained for
it, and every 64-token chunk of the output attends only to the neighbours of the previous chunk. Here the
neighbours are prepended to the unmodified LM as plain text, which is the In-Context RALM recipe; the
database, keys, [N, F] values, per-chunk query and re-retrieval stride follow RETRO.
**Quality signal:** `nll` (context value kept) is teacher-forced with the neighbours of the question's
retrieval only; there is no re-retrieval while the gold answer is teacher-forced.
**Knobs:** k, chunk_tokens, stride (default 16, so a default-length answer re-retrieves at least once;
RETRO used 64, In-Context RALM 4-32; down to 4 here),
continuation on/off.
**Models:** any causal LM with a KV cache; recurrent models are refused with a clear message.
**When no re-retrieval happens:** an answer that ends before `stride` tokens never re-retrieves. Its notes then
say so ("no re-retrieval: the answer ended after N tokens, before the first one at `stride` tokens (stride)"),
its events hold the question's retrieval only, and the view shows only *text* neighbours: that answer is RAG
over [N, F] neighbours, nothing more.
{measured}""".replace("{measured}", measured_paragraph())

    # ------------------------------------------------------------ retrieval
    def question_queries(self, tokenizer, question: str, chunk_tokens: int) -> list[str]:
        """The question cut into `chunk_tokens`-token pieces; each piece is one retrieval query."""
        ids = encode(tokenizer, question.strip())
        pieces = [ids[i: i + chunk_tokens] for i in range(0, len(ids), chunk_tokens)] or [ids]
        return [tokenizer.decode(p, skip_special_tokens=True) for p in pieces]

    def search(self, corpus, queries: list[str], k: int) -> list[list[dict]]:
        """One place for the database lookup, so tests can substitute what a retrieval returns."""
        return corpus.search(queries, k)

    def neighbours(self, corpus, queries: list[str], params) -> list[dict]:
        """k neighbours per query (best first, duplicates dropped), each with its continuation chunk or None."""
        best: dict[int, dict] = {}
        for hits in self.search(corpus, queries, params.k):
            for hit in hits:
                if hit["chunk_id"] not in best or hit["score"] > best[hit["chunk_id"]]["score"]:
                    best[hit["chunk_id"]] = dict(hit)
        found = sorted(best.values(), key=lambda h: -h["score"])
        for hit in found:
            hit["continuation"] = corpus.store.next_chunk(hit) if params.continuation else None
        return found

    def timed_neighbours(self, corpus, queries, params) -> tuple[list[dict], float]:
        corpus.embedder, corpus.index()  # loading is not retrieval
        start = time.perf_counter()
        found = self.neighbours(corpus, queries, params)
        return found, time.perf_counter() - start

    # --------------------------------------------------------------- prompt
    def context(self, lm, question: str, found: list[dict], mark: str, budget: int) -> tuple[Prompt, int]:
        """[instruction][neighbours + continuations][question]; the weakest neighbours are dropped until it
        fits in `budget` tokens. Returns the prompt and how many neighbours were dropped."""
        kept = list(found)
        while True:
            prompt = build_prompt(lm.tokenizer, question, neighbour_passages(kept))
            if len(prompt) <= budget or not kept:
                break
            kept.pop()
        for segment in prompt.segments:
            if segment.kind == "passage":
                segment.mark = mark
        return prompt, len(found) - len(kept)

    # ---------------------------------------------------------------- answer
    def check(self, corpus, params) -> None:
        corpus.require_documents(self.name)  # its knobs' bounds are declared on RetroParams
        if not supports_kv_cache(corpus.lm):
            raise NotSupported(f"retro rebuilds a KV cache when neighbours change; '{corpus.lm.model_id}' is a "
                               "recurrent model without one (use rag or jrt with it)")

    def answer(self, question, corpus, params, stream=None) -> Result:
        t0 = time.perf_counter()
        self.check(corpus, params)
        lm = corpus.lm
        budget = lm.window - params.max_new_tokens
        queries = self.question_queries(lm.tokenizer, question, params.chunk_tokens)
        found, retrieve_s = self.timed_neighbours(corpus, queries, params)
        prompt, dropped = self.context(lm, question, found, "text", budget)
        result = Result(self.name, retrieve_s=retrieve_s)
        if dropped:
            result.notes.append(f"{dropped} weakest neighbours left out to fit the {lm.window}-token window")
        run = _Run(self, lm, corpus, params, question, prompt, result, budget)
        result.events.append(_event("question", 0, queries, found, True, retrieve_s,
                                    f"prefilled {len(prompt)} tokens", len(prompt)))
        run.cache, start, hit = prefix_cache(lm).start(lm, prompt.ids)  # the shared prefix, as for every method
        run.processed, result.cached_tokens = (0, start) if hit else (start, 0)
        logits = run.prefill_from(start, prompt.ids)
        generation = decode_loop(lm, run.cache, logits, len(prompt), params.max_new_tokens, t0, stream,
                                 step=run.step)
        result.retrieve_s = sum(e["retrieve_s"] for e in result.events)
        finish(result, lm, run.prompt, generation, t0, processed=run.processed)
        result.sources = _unique_sources(run.sources + result.sources)
        swaps = sum(1 for e in result.events if e["kind"] == "re-retrieval" and e["changed"])
        re_retrievals = sum(1 for e in result.events if e["kind"] == "re-retrieval")
        if re_retrievals:
            result.notes.append(f"{re_retrievals} re-retrievals (every {params.stride} tokens); neighbours replaced "
                                f"{swaps} times; processed_tokens counts every re-prefill")
        else:  # the card promises re-retrieval: say plainly when the answer was too short for one
            result.notes.append(f"no re-retrieval: the answer ended after {result.new_tokens} tokens, before the "
                                f"first one at {params.stride} tokens (stride)")
        return result

    def nll(self, question, gold, corpus, params) -> float:
        """Teacher-forced with the neighbours of the question's retrieval (no re-retrieval over the gold)."""
        self.check(corpus, params)
        lm = corpus.lm
        found = self.neighbours(corpus, self.question_queries(lm.tokenizer, question, params.chunk_tokens), params)
        prompt, _ = self.context(lm, question, found, "text", lm.window - len(encode(lm.tokenizer, gold)) - 1)
        return nll_of_answer(lm, prompt.ids, gold)


@dataclass
class _Run:
    """The state of one answer: the context in use, the KV cache over it and the tokens generated so far."""

    method: Retro
    lm: object
    corpus: object
    params: RetroParams
    question: str
    prompt: Prompt
    result: Result
    budget: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    generated: list[int] = field(default_factory=list)
    processed: int = 0
    sources: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.question_ids = encode(self.lm.tokenizer, self.question.strip())
        self.sources = [s.source for s in self.prompt.segments if s.source]

    def prefill_from(self, keep: int, ids: list[int]) -> torch.Tensor:
        """Keep the first `keep` cached tokens and run `ids[keep:]` after them; returns the last logits.
        Counted in processed_tokens (a plain decode step is not, as for every other method)."""
        self.processed += len(ids) - keep
        return self.run_after(keep, ids)

    def run_after(self, keep: int, ids: list[int]) -> torch.Tensor:
        cached = self.cache.get_seq_length()
        if cached > keep:
            self.cache.crop(keep - cached)  # transformers 5.2x: a negative count = tokens to drop from the end
        with torch.inference_mode():
            return self.lm.model(input_ids=torch.tensor([ids[keep:]], device=self.lm.device),
                                 past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits

    def step(self, token: torch.Tensor, _pos: int, _cache) -> torch.Tensor:
        """decode_loop's hook: called with each generated token before the next one is predicted."""
        self.generated.append(int(token.reshape(-1)[0]))
        if len(self.generated) % self.params.stride:
            return self.run_after(self.cache.get_seq_length(), self.sequence())
        return self.re_retrieve()

    def sequence(self) -> list[int]:
        return self.prompt.ids + self.generated

    def re_retrieve(self) -> torch.Tensor:
        """Query with the last chunk_tokens tokens of question + answer so far; swap the neighbours if they changed."""
        tail = (self.question_ids + self.generated)[-self.params.chunk_tokens:]
        query = self.lm.tokenizer.decode(tail, skip_special_tokens=True)
        found, seconds = self.method.timed_neighbours(self.corpus, [query], self.params)
        step = len(self.generated)
        if _chunk_ids(found) == _chunk_ids(self.current):
            self.result.events.append(_event("re-retrieval", step, [query], found, False, seconds,
                                             "neighbours unchanged: KV cache kept", len(self.prompt)))
            return self.run_after(self.cache.get_seq_length(), self.sequence())
        old = self.sequence()[: self.cache.get_seq_length()]
        self.prompt, dropped = self.method.context(self.lm, self.question, found, "retrieved",
                                                   self.budget - len(self.generated))
        self.sources += [s.source for s in self.prompt.segments if s.source]
        new = self.sequence()
        keep = min(_common_prefix(old, new), len(new) - 1)
        self.result.events.append(_event("re-retrieval", step, [query], found, True, seconds,
                                         f"context rebuilt: kept {keep} cached tokens, prefilled {len(new) - keep}"
                                         + (f", {dropped} neighbours left out to fit" if dropped else ""),
                                         len(self.prompt)))
        return self.prefill_from(keep, new)

    @property
    def current(self) -> list[dict]:
        """The neighbours behind the context in use (from the latest retrieval that changed it)."""
        for event in reversed(self.result.events):
            if event["changed"]:
                return [{"chunk_id": c} for c in event["chunk_ids"]]
        return []


def neighbour_passages(found: list[dict]) -> list[dict]:
    """Neighbours and their continuations as passages: chunks that touch are joined, in document order, so a
    neighbour whose continuation is another neighbour is not read twice."""
    chunks: dict[int, dict] = {}
    for hit in found:
        chunks.setdefault(hit["chunk_id"], hit)
    for hit in found:
        follow = hit.get("continuation")
        if follow and follow["chunk_id"] not in chunks:
            chunks[follow["chunk_id"]] = {**follow, "score": hit["score"]}
    return group_passages(list(chunks.values()))


def _chunk_ids(found: list[dict]) -> list[int]:
    return sorted(h["chunk_id"] for h in found)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _event(kind: str, step: int, queries: list[str], found: list[dict], changed: bool, seconds: float,
           action: str, context_tokens: int) -> dict:
    return {"kind": kind, "step": step, "query": queries[0] if len(queries) == 1 else queries,
            "chunk_ids": [h["chunk_id"] for h in found],
            "continuation_ids": [h["continuation"]["chunk_id"] for h in found if h.get("continuation")],
            "changed": changed, "action": action, "context_tokens": context_tokens,
            "retrieve_s": round(seconds, 5)}


def _unique_sources(sources: list[dict]) -> list[dict]:
    seen, out = set(), []
    for source in sources:
        key = (source.get("doc"), source.get("chunk_id"))
        if key not in seen:
            seen.add(key)
            out.append(source)
    return out
