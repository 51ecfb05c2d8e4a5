"""CacheBlend-style: every chunk's full KV computed once, reused at answer time, a fraction r recomputed."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..engine import kv as kvc
from ..engine.blend import selective_recompute
from ..engine.generate import decode_loop
from ..engine.layers import logits, require_llama_like
from ..engine.prefix import shared_prefix
from ..engine.prepare_pass import ChunkPass, Needs
from ..engine.prompt import Prompt, Segment
from ..engine.scoring import answer_ids, mean_nll
from ..errors import UserError
from ..store import artifact_hash
from ..params import out_of_range
from .base import Params, Result, answer_clock, finish, knob, load_seconds, per_token
from .chunk_artifacts import PerChunkArtifacts, token_budget

@dataclass
class CacheBlendParams(Params):
    k: int = knob(5, "chunks retrieved, as rag", label="chunks retrieved", min=1, max=500)
    r: float = knob(0.15, "share of passage tokens recomputed through the upper layers (0 = pure reuse, 1 = full "
                          "prefill)", label="recomputed share", min=0, max=1)
    selection_layer: int = knob(1, "layer where reused and fresh KV are compared; layers below run for every token "
                                   "(below the model's layer count)", label="selection layer", min=0, max=255)
    gradual: bool = knob(False, "pick 2x the tokens at the selection layer and narrow to r at the next one")
    # int8: half of fp16's bytes at the same value kept (the suite's storage=fp16 rows beside the default)
    storage: str = knob("int8", "how each chunk's KV is kept: fp16, or quantised with a scale per token "
                                "(int8, k8v4 = keys 8-bit and values 4-bit, int4)", choices=kvc.STORAGE_DTYPES)


class CacheBlend(PerChunkArtifacts):
    name = "cacheblend"
    label = "CacheBlend-style KV reuse + selective recompute"
    order = 8
    Params = CacheBlendParams

    # ------------------------------------------------------------ offline
    artifact_format = 2  # 2: made by the shared batched pass; offsets left out of full caches

    def needs(self, params) -> Needs:
        return Needs(kv=True)

    def artifact(self, lm, params, result: ChunkPass) -> bytes:
        """The chunk's full KV, read alone behind the instruction prefix, keys made position-free."""
        return kvc.to_bytes(result.kv, params.storage)

    def digest(self, lm, params) -> str:
        return artifact_hash({"base": super().digest(lm, params), "storage": params.storage})

    # ------------------------------------------------------------- answer
    def answer(self, question, corpus, params, stream=None) -> Result:
        t0 = time.perf_counter()
        lm = self.check(corpus, params)
        ctx = self._context(question, corpus, params)
        t0 = answer_clock(t0, ctx.result.prepare_s)  # building missing caches is preparation, not this answer
        with torch.inference_mode():
            first = logits(lm, ctx.suffix_hidden[:, -1:])  # only the last position predicts the first token
            generation = decode_loop(lm, ctx.cache, first, ctx.next_pos, params.max_new_tokens, t0, stream)
        result = finish(ctx.result, lm, ctx.prompt, generation, t0, overhead=ctx.overhead)
        account = self.storage(corpus, params)
        result.bytes_per_token = per_token(account.total, account.tokens)
        # after finish: decoding every passage token for the view stays outside total_s
        return _mark_recomputed(result, ctx.prompt, ctx.recomputed, lm.tokenizer)

    def nll(self, question, gold, corpus, params) -> float:
        lm = self.check(corpus, params)
        target = answer_ids(lm.tokenizer, gold)
        ctx = self._context(question, corpus, params, target)
        with torch.inference_mode():
            scores = logits(lm, ctx.suffix_hidden[:, len(ctx.question_ids) - 1:])
        return mean_nll(scores, target)

    # ------------------------------------------------------------ helpers
    def check(self, corpus, params):
        lm = corpus.lm
        require_llama_like(lm, "cacheblend")
        self.check_knobs(params, lm)
        return lm

    def check_knobs(self, params, lm) -> None:
        if params.selection_layer >= lm.n_layers:
            raise out_of_range(params, "selection_layer", f"a whole number from 0 to {lm.n_layers - 1} for this model",
                               self.name)

    def _context(self, question, corpus, params, after: list[int] = ()) -> "_Context":
        """The blended cache with the question (then `after`, e.g. a gold answer to score) run in the same pass."""
        lm = corpus.lm
        got = self.retrieved(question, corpus, params.k)
        text_prompt, passages, result = got.prompt, got.passages, got.result
        load_start = time.perf_counter()
        prefix = shared_prefix(lm, text_prompt.segments[0].ids)
        kvs = [kvc.from_bytes(b, lm.model.dtype, lm.device) for b in self.fetch(corpus, params, got.hits, result)]
        if [p.n_tokens for p in kvs] != [len(s.ids) for s in passages]:
            raise UserError("cacheblend: a stored cache does not match its chunk's tokens; run prepare again")
        starts = [len(prefix) + sum(len(s.ids) for s in passages[:i]) for i in range(len(passages))]
        with torch.inference_mode():
            suffix = text_prompt.segments[-1].ids + list(after)
            layers = kvc.placed_layers(lm, prefix.layers, kvs, starts, reserve=len(suffix))
            result.load_s = load_seconds(load_start, result.prepare_s)
            ids = [t for s in passages for t in s.ids]
            keep = token_budget(params.r, len(ids))
            blend = selective_recompute(lm, layers, ids, len(prefix), keep, params.selection_layer, params.gradual,
                                        suffix)
        n = len(ids)
        result.chunk_bytes_per_token = per_token(result.storage_bytes, n)
        result.notes.append(_recompute_note(params, n, len(blend.recomputed), lm.n_layers))
        marked = [Segment("prefix", prefix.ids, "text" if prefix.fresh else "cached")]
        lengths = [len(s.ids) for s in passages]
        for segment, layers in zip(passages, _split_values(blend.passage_layers, lengths)):
            computed = sum(layers) / lm.n_layers  # the rest of each token's layers kept its reused KV
            marked.append(Segment("passage", segment.ids, "cached", segment.source, processed=computed,
                                  cached=len(segment.ids) - computed))
        marked.append(text_prompt.segments[-1])
        return _Context(kvc.cache_from(blend.layers), len(prefix) + n + len(suffix), text_prompt.segments[-1].ids,
                        blend.suffix_hidden, Prompt(marked), result, _split(blend.recomputed, lengths),
                        blend.selection_overhead / lm.n_layers)


@dataclass
class _Context:
    cache: object  # prefix, blended passages, question (and `after`)
    next_pos: int  # the position after everything in the cache
    question_ids: list[int]
    suffix_hidden: torch.Tensor  # last layer's output over the question (and `after`)
    prompt: Prompt
    result: Result
    recomputed: list[list[int]]  # per passage, 1 where the token was recomputed through the upper layers
    overhead: float  # selection projections redone by the recompute (token-layers / layers): GLOSSARY overhead


def _split(indices: list[int], lengths: list[int]) -> list[list[int]]:
    """Per passage, 1 for each of its tokens whose index is in `indices`, else 0."""
    chosen = set(indices)
    return _split_values([int(i in chosen) for i in range(sum(lengths))], lengths)


def _split_values(values: list, lengths: list[int]) -> list[list]:
    """`values` (one per passage token, all passages in order) cut into one list per passage."""
    out, offset = [], 0
    for length in lengths:
        out.append(values[offset:offset + length])
        offset += length
    return out


def _recompute_note(params, n: int, recomputed: int, n_layers: int) -> str:
    if recomputed == 0:
        return f"pure reuse: all {n} passage tokens read from their chunk caches, none recomputed (r={params.r:g})"
    return (f"{recomputed} of {n} passage tokens recomputed through layers {params.selection_layer + 1}-{n_layers - 1} "
            f"(r={params.r:g}, highest KV deviation at layer {params.selection_layer}"
            f"{', gradual' if params.gradual else ''}); layers 0-{params.selection_layer} ran for every passage token")


def _mark_recomputed(result: Result, prompt: Prompt, flags: list[list[int]], tokenizer) -> Result:
    """"What the model sees": each passage token, with 1 where it was recomputed and 0 where its cache was reused."""
    views = [v for v in result.segments if v["kind"] == "passage"]
    segments = [s for s in prompt.segments if s.kind == "passage"]
    for view, segment, row in zip(views, segments, flags):
        view["tokens"] = [tokenizer.decode([i]) for i in segment.ids]
        view["recomputed"] = row
        view["recomputed_tokens"] = sum(row)
    return result
