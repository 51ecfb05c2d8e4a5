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
from ..store import reading_order
from .base import Method, Params, Result, finish, knob


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
        run.cache, start, hit = prefix_cache(lm).start(lm, prompt.ids)  # the shared prefix, as for every method
        if hit:
            prompt.segments[0].read_from_cache(start)
        prefill_start = time.perf_counter()
        logits = run.run_after(start, prompt.ids)
        result.events.append(_event("question", 0, queries, found, True, retrieve_s,
                                    f"prefilled {len(prompt) - (start if hit else 0)} tokens", len(prompt),
                                    len(prompt) - (start if hit else 0), time.perf_counter() - prefill_start))
        generation = decode_loop(lm, run.cache, logits, len(prompt), params.max_new_tokens, t0, stream,
                                 step=run.step)
        # the fields describe the answer up to its first token; what re-retrieval did later is in the events
        finish(result, lm, prompt, generation, t0)
        result.sources = _unique_sources(result.sources + run.sources)
        later = [e for e in result.events if e["kind"] == "re-retrieval"]
        if later:
            swaps = [e for e in later if e["changed"]]
            result.notes.append(f"{len(later)} re-retrievals after the first answer token (every {params.stride} "
                                f"tokens, {sum(e['retrieve_s'] for e in later):.3f} s); neighbours replaced "
                                f"{len(swaps)} times, re-prefilling {sum(e['prefilled_tokens'] for e in swaps)} tokens "
                                f"({sum(e['prefill_s'] for e in swaps):.3f} s): in the events, not in the token "
                                "fields or TTFT")
        else:  # the card promises re-retrieval: say plainly why there was none
            why = "was cut at the Compare's time limit" if getattr(stream, "cut", False) else "ended"
            result.notes.append(f"no re-retrieval: the answer {why} after {result.new_tokens} tokens, before the "
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
    sources: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.question_ids = encode(self.lm.tokenizer, self.question.strip())

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
                                             "neighbours unchanged: KV cache kept", len(self.prompt), 0, 0.0))
            return self.run_after(self.cache.get_seq_length(), self.sequence())
        old = self.sequence()[: self.cache.get_seq_length()]
        self.prompt, dropped = self.method.context(self.lm, self.question, found, "retrieved",
                                                   self.budget - len(self.generated))
        self.sources += [s.source for s in self.prompt.segments if s.source]
        new = self.sequence()
        keep = min(_common_prefix(old, new), len(new) - 1)
        started = time.perf_counter()
        logits = self.run_after(keep, new)
        self.result.events.append(_event("re-retrieval", step, [query], found, True, seconds,
                                         f"context rebuilt: kept {keep} cached tokens, prefilled {len(new) - keep}"
                                         + (f", {dropped} neighbours left out to fit" if dropped else ""),
                                         len(self.prompt), len(new) - keep, time.perf_counter() - started))
        return logits

    @property
    def current(self) -> list[dict]:
        """The neighbours behind the context in use (from the latest retrieval that changed it)."""
        for event in reversed(self.result.events):
            if event["changed"]:
                return [{"chunk_id": c} for c in event["chunk_ids"]]
        return []


def neighbour_passages(found: list[dict]) -> list[dict]:
    """Neighbours and their continuations as passages, in the layout every method reads (`reading_order`: one
    per chunk, document order); a neighbour whose continuation is another neighbour is read once."""
    chunks: dict[int, dict] = {}
    for hit in found:
        chunks.setdefault(hit["chunk_id"], hit)
    for hit in found:
        follow = hit.get("continuation")
        if follow and follow["chunk_id"] not in chunks:
            chunks[follow["chunk_id"]] = {**follow, "score": hit["score"]}
    return reading_order(list(chunks.values()))


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
           action: str, context_tokens: int, prefilled: int, prefill_s: float) -> dict:
    """One retrieval: at the question (step 0) or after `step` generated tokens, with its own counts and seconds
    (re-retrievals happen after the first answer token, so they are never in the answer's token fields)."""
    return {"kind": kind, "step": step, "query": queries[0] if len(queries) == 1 else queries,
            "chunk_ids": [h["chunk_id"] for h in found],
            "continuation_ids": [h["continuation"]["chunk_id"] for h in found if h.get("continuation")],
            "changed": changed, "action": action, "context_tokens": context_tokens,
            "retrieve_s": round(seconds, 5), "prefilled_tokens": prefilled, "prefill_s": round(prefill_s, 5)}


def _unique_sources(sources: list[dict]) -> list[dict]:
    seen, out = set(), []
    for source in sources:
        key = (source.get("doc"), source.get("chunk_id"))
        if key not in seen:
            seen.add(key)
            out.append(source)
    return out
