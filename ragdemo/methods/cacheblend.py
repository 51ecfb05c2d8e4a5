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
from .base import Params, Result, finish, knob
from .chunk_artifacts import PerChunkArtifacts, token_budget

@dataclass
class CacheBlendParams(Params):
    k: int = knob(5, "chunks retrieved, as rag", label="chunks retrieved", min=1, max=500)
    r: float = knob(0.15, "share of passage tokens recomputed through the upper layers (0 = pure reuse, 1 = full "
                          "prefill)", label="recomputed share", min=0, max=1)
    selection_layer: int = knob(1, "layer where reused and fresh KV are compared; layers below run for every token "
                                   "(below the model's layer count)", label="selection layer", min=0, max=255)
    gradual: bool = knob(False, "pick 2x the tokens at the selection layer and narrow to r at the next one")
    # int8: half of fp16's bytes at the same value kept (the card's storage rows; issue 34's 2-point rule)
    storage: str = knob("int8", "how each chunk's KV is kept: fp16, or quantised with a scale per token "
                                "(int8, k8v4 = keys 8-bit and values 4-bit, int4)", choices=kvc.STORAGE_DTYPES)


class CacheBlend(PerChunkArtifacts):
    name = "cacheblend"
    label = "CacheBlend-style KV reuse + selective recompute"
    order = 8
    Params = CacheBlendParams
    card = """### CacheBlend-style KV reuse with selective recompute (Yao et al., EuroSys 2025)
**Paper:** RAG prompts are made of retrieved chunks whose KV caches could be precomputed, but a chunk's cache
computed alone never attended to the chunks before it, so reusing it as is ("full KV reuse") loses the
cross-chunk attention and quality drops. CacheBlend reuses every chunk's cache and recomputes the KV of a small
share of tokens (~15%), the ones whose reused KV deviates most from a full prefill ("high-KV-deviation"
tokens). It finds them at an early layer (after recomputing the first layer fully) and narrows the set over
the next layers ("gradual filtering"); the recompute is pipelined with loading the caches from disk.

**Here:**
- Offline (`prepare`): each 64-token chunk is prefilled alone behind the shared instruction prefix (in the shared
  preparation pass, batched with every other method's work) and its full KV is stored (keys without RoPE, as
  `storage`: fp16, int8, k8v4 (keys int8, values 4-bit) or int4, with one fp16 scale per token and head), keyed by the chunk's text hash, the model,
  its dtype, the storage and a format version. That is LLoCO's capture path at c=1.
- Answer: the top-k chunks (MiniLM, as rag) are read in document order, one passage per chunk, in rag's prompt
  layout; their caches are loaded and keys re-rotated to where each chunk lands behind the cached prefix.
  Layers below `selection_layer` run for every passage token; at the selection layer only their keys and values
  are projected (what the comparison needs, about a sixth of a layer) and compared with the reused ones (squared
  distance of keys and values); all fresh KV there is written back and the `r` share that deviates most goes on
  through the rest of that layer and every later one, attending to the mixed cache and replacing its own KV
  (`gradual`: 2r is picked and the next layer narrows it to r). The question runs in the same pass, always
  selected (CacheBlend blends inside the one prefill that also computes the query), so every layer's weights
  are read once before decoding; only its last position is projected onto the vocabulary. Then decoding runs as usual.
- Exact: r=1 is a full prefill of the same token sequence rag reads (test: rag's logits). r=0 is pure reuse
  (test). The first chunk sits right after the prefix in both the
  capture and the prompt, so its reused KV is already exact.
- Approximated: every token not selected keeps its reused KV in the layers above the selection layer; no
  pipelining with loading (the blobs are read from SQLite first); the deviation is measured at one layer.
- Cost: `processed_tokens` counts token-layers ÷ layers: all passage tokens through layers ≤ selection layer
  (the KV projection alone at the selection layer counted as a whole layer: an upper bound), the r share
  through the rest, plus the question. The fixed cost of r > 0 over pure reuse is the layers below the
  selection layer for every passage token plus one pass over the upper layers' weights. Storage is the full KV: ~23 kB per token in fp16 for SmolLM2-135M, ~11.9 kB in int8.
- Knobs: k, r, selection_layer, gradual, storage."""

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
        t0 += ctx.result.prepare_s  # building missing caches is preparation, not part of this answer's clock
        with torch.inference_mode():
            first = logits(lm, ctx.suffix_hidden[:, -1:])  # only the last position predicts the first token
            generation = decode_loop(lm, ctx.cache, first, ctx.next_pos, params.max_new_tokens, t0, stream)
        result = finish(ctx.result, lm, ctx.prompt, generation, t0, overhead=ctx.overhead)
        result.bytes_per_token = round(self.storage(corpus, params).bytes_per_token, 1)
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
            result.load_s = time.perf_counter() - load_start - result.prepare_s
            ids = [t for s in passages for t in s.ids]
            keep = token_budget(params.r, len(ids))
            blend = selective_recompute(lm, layers, ids, len(prefix), keep, params.selection_layer, params.gradual,
                                        suffix)
        n = len(ids)
        result.chunk_bytes_per_token = round(result.storage_bytes / max(1, n), 1)
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
