"""LLMLingua-style prompt compression: keep the retrieved passages' most informative tokens, read them as text."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

from ..engine.generate import generate, supports_kv_cache
from ..engine.prefix import compute_prefix
from ..engine.prepare_pass import ChunkPass, Needs
from ..engine.prompt import Prompt, Segment, build_prompt
from ..engine.scoring import nll_of_answer
from ..engine.surprisal import computed_rows, surprisal
from ..errors import NotSupported, UserError
from .base import Params, Result, answer_clock, count_cached_prefix, finish, knob, load_seconds, per_token
from .chunk_artifacts import PerChunkArtifacts, token_budget

@dataclass
class LinguaParams(Params):
    k: int = knob(5, "chunks retrieved, as rag", label="chunks retrieved", min=1, max=500)
    ratio: float = knob(0.5, "share of passage tokens kept", label="kept share", above=0, max=1)
    question_aware: bool = knob(False, "LongLLMLingua's contrastive score: costs a forward of the passages at answer "
                                       "time")
    # word + spread 0.5: chosen on one question set, confirmed on another (the results suite's heldout run)
    unit: str = knob("word", "word = whole words kept or dropped; token = single tokens dropped (LLMLingua)",
                     choices=("word", "token"))
    spread: float = knob(0.5, "0 = one budget pooled over the passages; > 0 = LongLLMLingua's dynamic ratio by rank "
                              "(how much more the top-ranked passage keeps than the mean)", min=0, max=1)


class Lingua(PerChunkArtifacts):
    name = "lingua"
    label = "LLMLingua-style prompt compression"
    order = 9
    Params = LinguaParams

    # ------------------------------------------------------------ offline
    def needs(self, params) -> Needs:
        return Needs(surprisal=True)

    def artifact(self, lm, params, result: ChunkPass) -> bytes:
        """The chunk's per-token surprisal, read alone behind the instruction prefix, as fp16."""
        return save_numpy({"surprisal": result.surprisal.numpy().astype(np.float16)})

    # ------------------------------------------------------------- answer
    def answer(self, question, corpus, params, stream=None) -> Result:
        t0 = time.perf_counter()
        lm = self.check(corpus, params)
        plan = self._plan(question, corpus, params)
        t0 = answer_clock(t0, plan.result.prepare_s)  # scoring chunks not prepared yet is preparation, not this answer
        generation = generate(lm, plan.kept.ids, params.max_new_tokens, t0, stream)
        count_cached_prefix(plan.shown, generation)
        # the view shows every passage token; each passage segment counts the kept ones, which the model reads
        result = finish(plan.result, lm, plan.shown, generation, t0, overhead=plan.scoring_tokens,
                        kept_tokens=[len(s.ids) for s in plan.kept.segments if s.kind == "passage"])
        account = self.storage(corpus, params)
        result.bytes_per_token = per_token(account.total, account.tokens)
        return result

    def nll(self, question, gold, corpus, params) -> float:
        self.check(corpus, params)
        return nll_of_answer(corpus.lm, self._plan(question, corpus, params).kept.ids, gold)

    # ------------------------------------------------------------ helpers
    def check(self, corpus, params):
        lm = corpus.lm
        if not supports_kv_cache(lm):
            raise NotSupported(f"lingua scores tokens with a KV-cached forward; '{lm.model_id}' has none")
        return lm  # its knobs' bounds and choices are declared on LinguaParams

    def _plan(self, question, corpus, params) -> "_Plan":
        lm = corpus.lm
        got = self.retrieved(question, corpus, params.k)
        full, passages, result = got.prompt, got.passages, got.result
        load_start = time.perf_counter()
        scores = [torch.from_numpy(load_numpy(b)["surprisal"].astype(np.float32))
                  for b in self.fetch(corpus, params, got.hits, result)]
        result.load_s = load_seconds(load_start, result.prepare_s)
        if [len(s) for s in scores] != [len(p.ids) for p in passages]:
            raise UserError("lingua: stored scores do not match their chunk's tokens; run prepare again")
        n = sum(len(p.ids) for p in passages)
        scoring_tokens = 0
        if params.question_aware:
            given, scoring_tokens = _surprisal_given_question(lm, question, passages)
            scores = [alone - with_q for alone, with_q in zip(scores, given)]
        words = [word_starts(lm.tokenizer, p.ids) for p in passages] if params.unit == "word" else None
        count = token_budget(params.ratio, n)
        if params.spread > 0:  # each passage its own budget, larger for the ones the retriever ranks higher
            budgets = rank_budgets([len(p.ids) for p in passages], [p.source["score"] for p in passages], count,
                                   params.spread)
            flags = [keep_flags([s], b, [w] if words else None)[0]
                     for s, b, w in zip(scores, budgets, words or [None] * len(scores))]
        else:
            flags = keep_flags(scores, count, words)
        result.chunk_bytes_per_token = per_token(result.storage_bytes, n)
        kept_n = sum(sum(f) for f in flags)
        budget = (f"per passage by retrieval rank, spread {params.spread:g}: "
                  + "/".join(str(sum(f)) for f in flags) if params.spread > 0 else "pooled over the passages")
        result.notes.append(f"{kept_n} of {n} passage tokens kept (ratio {params.ratio:g}, {budget}, {params.unit}s, "
                            f"{'contrastive score given the question' if params.question_aware else 'self-information'})")
        if scoring_tokens:
            result.notes.append(f"question-aware scoring ran {scoring_tokens} tokens (question prefix + every retrieved "
                                f"passage, padded to a batch) through the model before the prompt: counted as overhead "
                                f"tokens and in TTFT")
        shown = [full.segments[0]] + [Segment("passage", p.ids, "pruned", p.source, [float(f) for f in row],
                                              processed=float(sum(row)), cached=0.0)
                                      for p, row in zip(passages, flags)] + [full.segments[-1]]
        kept = [full.segments[0]] + [Segment("passage", [t for t, f in zip(p.ids, row) if f], "text", p.source)
                                     for p, row in zip(passages, flags)] + [full.segments[-1]]
        return _Plan(Prompt(kept), Prompt(shown), result, scoring_tokens)


@dataclass
class _Plan:
    kept: Prompt  # what the model reads
    shown: Prompt  # every passage token with its keep flag, for "what the model sees"
    result: Result
    scoring_tokens: int  # tokens run through the model at answer time only to score (question_aware)


SPACE_MARKS = "ĠĊĉ▁"  # how byte-level BPE (space, newline, tab) and SentencePiece (space) spell whitespace in a piece


def word_starts(tokenizer, ids: list[int]) -> list[bool]:
    """True where a token starts a word. A token continues the word before it when its piece begins with a letter
    or digit (not a whitespace mark such as BPE's 'Ġ' or SentencePiece's '▁', which are letters to Python) and
    the piece before ends with one: "Eif|fel" and "18|89" are one word each, punctuation is a word of its own."""
    pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]
    return [i == 0 or not (_word_char(piece[:1]) and _word_char(pieces[i - 1][-1:])) for i, piece in enumerate(pieces)]


def _word_char(char: str) -> bool:
    return char.isalnum() and char not in SPACE_MARKS


def keep_flags(scores: list[torch.Tensor], count: int, words: list[list[bool]] | None = None) -> list[list[int]]:
    """1 for exactly `count` tokens over all passages, 0 for the rest.

    Without `words`: the `count` highest-scored tokens (ties: the earlier token). With `words` (word_starts per
    passage): whole words ranked by their most surprising token (a word is as informative as its least
    predictable piece; later pieces of a word are predictable once its start is read, so a sum or mean would
    only reward or punish length), kept greedily while they fit the budget; when no remaining word fits what
    is left, the best remaining word's first pieces fill it, so the count stays exact."""
    flat = torch.cat([s.float() for s in scores]).tolist() if scores else []
    chosen = torch.zeros(len(flat), dtype=torch.long)
    if words is None:
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:count]
        chosen[order] = 1
    else:
        for start, end in _fill(_spans([w for row in words for w in row]), flat, count):
            chosen[start:end] = 1
    return [row.tolist() for row in chosen.split([s.numel() for s in scores])]


def rank_budgets(lengths: list[int], scores: list[float], count: int, spread: float) -> list[int]:
    """LongLLMLingua's dynamic compression ratio: with mean ratio τ = count / Σ lengths, the passage ranked i-th of
    K (by retrieval score, best first) keeps τ + spread·(1 − 2i/(K−1)) of its tokens, clipped to [0, 1]; rounded
    so the budgets sum to exactly `count` (the remainder goes to the best-ranked passages with room, an excess is
    taken from the worst-ranked)."""
    total = sum(lengths)
    if not lengths or total == 0:
        return [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda j: (-scores[j], j))
    ratio, last = count / total, max(len(lengths) - 1, 1)
    budgets = [0] * len(lengths)
    for rank, j in enumerate(order):
        share = ratio + spread * (1 - 2 * rank / last) if len(lengths) > 1 else ratio
        budgets[j] = int(min(max(share, 0.0), 1.0) * lengths[j])
    left = count - sum(budgets)
    for j in (order if left > 0 else order[::-1]):
        step = min(left, lengths[j] - budgets[j]) if left > 0 else max(left, -budgets[j])
        budgets[j] += step
        left -= step
    return budgets


def _spans(starts: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each word from per-token start flags (every passage's first token starts a word)."""
    bounds = [i for i, s in enumerate(starts) if s or i == 0] + [len(starts)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def _fill(spans: list[tuple[int, int]], flat: list[float], count: int) -> list[tuple[int, int]]:
    ranked = sorted(spans, key=lambda s: (-max(flat[s[0]:s[1]]), s[0]))
    kept, left, rest = [], count, []
    for start, end in ranked:
        if end - start <= left:
            kept.append((start, end))
            left -= end - start
        else:
            rest.append((start, end))
    if left > 0 and rest:  # every remaining word is longer than what is left: cut the best one
        kept.append((rest[0][0], rest[0][0] + left))
    return kept


def _surprisal_given_question(lm, question: str, passages: list[Segment]) -> tuple[list[torch.Tensor], int]:
    """Each passage's surprisal when the question comes first (JRT's layout puts it before the context)."""
    question_prefix = build_prompt(lm.tokenizer, question, [{"text": "."}], repeat_context=True).segments[0].ids
    prefix = compute_prefix(lm, question_prefix)
    sequences = [p.ids for p in passages]
    return surprisal(lm, prefix, sequences), len(question_prefix) + computed_rows(sequences)
