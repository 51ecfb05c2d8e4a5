"""LLoCO-style: passages compressed offline into small KV caches, read at answer time with an optional LoRA."""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import torch

from ..engine import kv as kvc
from ..engine.generate import decode_loop
from ..engine.memo import lm_memo
from ..engine.layers import forward_all, require_llama_like
from ..engine.prefix import instruction_ids, prefix_cache, shared_prefix
from ..engine.lora import (LoraKnobs, adapter_key, applied_adapter, cloze_example, distill_kl, teacher_logits,
                           train_adapter)
from ..engine.prompt import Prompt, Segment, build_prompt, encode, passage_ids, question_ids
from ..engine.scoring import answer_ids, mean_nll
from ..errors import UserError
from ..engine.prepare_pass import Needs
from ..store import ArtifactRow, artifact_hash, chunk_key
from ..units import fmt_bytes
from .base import Params, Method, Result, StorageAccount, answer_clock, finish, knob, load_seconds, per_token
from .preparation import PassJob, run_jobs, stored_or_built, unique_chunks

RECIPE = "v2-distill"  # bump when the training recipe changes, so old adapters are not reused
FORMAT_VERSION = 2  # 2: made by the shared batched pass, one-byte offsets; bump when the blob layout changes


@dataclass
class LlocoParams(LoraKnobs, Params):
    k: int = knob(5, "chunks retrieved, as rag", label="chunks retrieved", min=1, max=500)
    c: int = knob(4, "compression ratio: keep 1/c of each passage's tokens per layer and KV head",
                  label="compression ratio", min=1, max=64)
    scorer: str = knob("reconstruct", "which tokens to keep: reconstruct (KVzip-style) or keynorm",
                       choices=("reconstruct", "keynorm"))
    storage: str = knob("k8v4", "number format of the stored cache: fp16, int8, k8v4 (keys int8, values 4-bit) or "
                                "int4", choices=kvc.STORAGE_DTYPES)
    positions: str = knob("original", "original: kept tokens keep their place in the passage; compact: packed",
                          choices=("original", "compact"))


class Lloco(Method):
    name = "lloco"
    label = "LLoCO-style compressed KV + LoRA"
    order = 7
    Params = LlocoParams
    has_prepare = True
    has_finetune = True

    # ------------------------------------------------------------ offline
    def prepare(self, corpus, params, progress=None) -> None:
        run_jobs(corpus, [self.pass_job(corpus, params)], progress)
        if params.train and params.lora and not self._has_adapter(corpus, self._check(corpus, params), params):
            self.finetune(corpus, params, progress)

    def pass_job(self, corpus, params, chunks: list[dict] | None = None) -> PassJob | None:
        """The chunks (default: the collection's) whose compressed cache is missing at these knobs, as a job for
        the shared pass: every layer's KV, plus the reconstruction scores with the `reconstruct` scorer. Chunks
        whose full cache is still in memory (another ratio prepared just before) are compressed without a
        forward. None when nothing is missing."""
        lm = self._check(corpus, params)
        corpus.require_documents(self.name)
        chunks = corpus.chunks() if chunks is None else chunks
        digest = self._artifact_hash(lm, params)
        have = corpus.store.artifact_keys(self.name, lm.model_id, digest, [chunk_key(c["text"]) for c in chunks])
        todo = unique_chunks(chunks, have)
        if not todo:
            return None
        prefix_ids = instruction_ids(lm)
        memo = _captures(lm)
        # held here: the pass's own captures may push them out of the memo before `finish` runs
        remembered = {chunk_key(c["text"]): (c, memo.get(_capture_key(lm, params, prefix_ids, c), lambda: None))
                      for c in todo if _capture_key(lm, params, prefix_ids, c) in memo}

        def row(chunk, full, scores) -> ArtifactRow:
            blob = kvc.to_bytes(kvc.compress(full, scores, params.c), params.storage)
            return ArtifactRow(self.name, lm.model_id, digest, chunk_key(chunk["text"]), blob,
                               chunk_id=chunk["chunk_id"], meta={"n_tokens": full.n_tokens})

        def take(batch: list[dict], results: list) -> list[ArtifactRow]:
            rows = []
            for chunk, result in zip(batch, results):
                scores = _scores(result)
                rows.append(row(chunk, result.kv, scores))  # compressed from the pass's fp32 keys, then stored
                memo.get(_capture_key(lm, params, prefix_ids, chunk), lambda: (_half(result.kv), scores))
            return rows

        def finish(progress) -> list[ArtifactRow]:
            progress(0.0, f"compressing {len(remembered)} chunk caches kept from an earlier pass")
            return [row(c, *captured) for c, captured in remembered.values()]

        needs = Needs(kv=True, reconstruct=params.scorer == "reconstruct")
        fresh = [c for c in todo if chunk_key(c["text"]) not in remembered]
        return PassJob(f"lloco (c={params.c}, {params.scorer}, {params.storage})", needs, prefix_ids, fresh, take,
                       finish if remembered else None)

    def _adapter_where(self, corpus, lm, params) -> tuple[str, str]:
        """(params hash, key) of the LoRA trained on the collection's current content at these knobs."""
        return self._adapter_hash(lm, params), adapter_key(corpus.store.content_signature(corpus.collection_id))

    def _has_adapter(self, corpus, lm, params) -> bool:
        digest, key = self._adapter_where(corpus, lm, params)
        return bool(corpus.store.artifact_keys(self.name, lm.model_id, digest, [key]))

    def _adapter(self, corpus, lm, params):
        """The collection's LoRA as a stored reference (read only the first time it is switched on), or None."""
        return corpus.store.artifact_ref(self.name, lm.model_id, *self._adapter_where(corpus, lm, params)) if params.lora else None

    def storage(self, corpus, params) -> StorageAccount:
        """Everything LLoCO keeps for the collection at these knobs: each chunk's compressed cache and the
        collection's LoRA (the instruction prefix's cache lives in memory only)."""
        lm = corpus.lm
        shared = {"adapter": self._adapter_where(corpus, lm, params)} if params.lora else {}
        chunk_bytes, shared_bytes = corpus.store.artifact_account(corpus.collection_id, self.name, lm.model_id,
                                                                  self._artifact_hash(lm, params), shared)
        return StorageAccount(chunk_bytes, shared_bytes, corpus.n_tokens())

    # ------------------------------------------------------------- answer
    def answer(self, question, corpus, params, stream=None) -> Result:
        t0 = time.perf_counter()
        lm = self._check(corpus, params)
        ctx = self._context(question, corpus, params)
        clock = answer_clock(t0, ctx.result.prepare_s)  # preparation is not answering: TTFT and total skip it
        with applied_adapter(lm, ctx.adapter):
            # reading the caches and switching the adapter on, without the chunks compressed just now
            ctx.result.load_s = load_seconds(ctx.load_start, ctx.result.prepare_s)
            with torch.inference_mode():
                first = forward_all(lm, torch.tensor([ctx.question_ids], device=lm.device), ctx.cache, ctx.next_pos,
                                    last_only=True)
                generation = decode_loop(lm, ctx.cache, first, ctx.next_pos + len(ctx.question_ids),
                                         params.max_new_tokens, clock, stream)
        result = finish(ctx.result, lm, self._marked_prompt(lm, ctx.view), generation, clock,
                        kept_tokens=ctx.kept_per_passage)  # per passage, its tokens the cache keeps (per layer, head)
        account = self.storage(corpus, params)
        result.bytes_per_token = per_token(account.total, account.tokens)
        return result

    def nll(self, question, gold, corpus, params) -> float:
        lm = self._check(corpus, params)
        ctx = self._context(question, corpus, params)
        target = answer_ids(lm.tokenizer, gold)
        ids = torch.tensor([ctx.question_ids + target], device=lm.device)
        with applied_adapter(lm, ctx.adapter), torch.inference_mode():
            logits = forward_all(lm, ids, ctx.cache, ctx.next_pos)
        return mean_nll(logits[:, len(ctx.question_ids) - 1:], target)

    # ----------------------------------------------------------- finetune
    def finetune(self, corpus, params, progress=None) -> str:
        """Train the collection's LoRA by distillation: on cloze questions about a chunk (among k-1 distractors),
        the model reading the compressed caches learns to match the full model reading the same chunks as text
        (KL at every question and answer position)."""
        lm = self._check(corpus, params)
        sig = corpus.store.content_signature(corpus.collection_id)  # the content this adapter is trained on
        compress_only = dataclasses.replace(params, train=False)  # prepare(train=True) is what called us
        self.prepare(corpus, compress_only, (lambda f, m: progress(0.2 * f, m)) if progress else None)
        chunks = [c for c in corpus.chunks() if len(encode(lm.tokenizer, c["text"])) >= 24]
        if len(chunks) < 2:
            raise UserError("lloco fine-tuning needs at least 2 chunks of 24+ tokens in the collection")
        rng = random.Random(0)
        digest = self._artifact_hash(lm, params)
        prefix_ids, prefix = self._prefix(lm)

        def loss_of_step(peft_model, student):
            picked, q_ids, target = cloze_example(lm.tokenizer, chunks, params.k, rng)
            passages, _, _ = self._load_passages(corpus, lm, params, digest, picked)  # base-model caches
            layers, next_pos = self._place(lm, prefix, passages, params)
            query = q_ids + target
            teacher = teacher_logits(student, peft_model.disable_adapter, prefix_ids,
                                     [passage_ids(lm.tokenizer, c["text"]) for c in picked], query)
            logits = forward_all(student, torch.tensor([query], device=lm.device), kvc.cache_from(layers), next_pos)
            return distill_kl(logits[0], teacher)

        training = train_adapter(lm, loss_of_step, params, (lambda f, m: progress(0.2 + 0.8 * f, m)) if progress else None,
                                 meta={"recipe": RECIPE, "c": params.c, "scorer": params.scorer})
        corpus.store.put_artifact(self.name, lm.model_id, self._adapter_hash(lm, params), adapter_key(sig),
                                  training.blob, collection_id=corpus.collection_id, basis=sig,
                                  meta={"loss_first": training.losses[0], "seconds": round(training.seconds, 1)})
        return training.summary(f"lloco LoRA r={params.lora_r} trained on {len(chunks)} chunks")

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _check(corpus, params):
        lm = corpus.lm
        require_llama_like(lm, "lloco")
        return lm  # its knobs' bounds and choices are declared on LlocoParams

    def _artifact_hash(self, lm, params) -> str:
        prefix_ids, _ = self._prefix(lm, compute=False)
        return artifact_hash({"format": FORMAT_VERSION, "dtype": str(lm.dtype), "c": params.c, "scorer": params.scorer,
                              "storage": params.storage, "prefix": prefix_ids,
                              "cue": kvc.RECONSTRUCT_CUE if params.scorer == "reconstruct" else ""})

    def _adapter_hash(self, lm, params) -> str:
        return artifact_hash({"kv": self._artifact_hash(lm, params), "positions": params.positions, "k": params.k,
                              "r": params.lora_r, "steps": params.lora_steps, "lr": params.lora_lr, "recipe": RECIPE})

    @staticmethod
    def _prefix(lm, compute: bool = True):
        prefix_ids = instruction_ids(lm)
        if not compute:
            return prefix_ids, None
        return prefix_ids, shared_prefix(lm, prefix_ids).layers  # the LM's prefix cache, shared by every method

    def _load_passages(self, corpus, lm, params, digest, chunks):
        """Compressed caches of these chunks, their blob sizes, and the seconds spent compressing the chunks that
        were not prepared yet (stored for next time; that is preparation, not answering)."""
        keys = [chunk_key(c["text"]) for c in chunks]
        blobs, _, prepare_s = stored_or_built(corpus, self, params, digest, chunks)
        passages = [kvc.from_bytes(blobs[key], lm.model.dtype, lm.device) for key in keys]
        return passages, [len(blobs[key]) for key in keys], prepare_s

    @staticmethod
    def _place(lm, prefix, passages, params):
        """Where each passage goes: after the prefix, either spaced as the full text would be or packed."""
        if params.positions == "compact":
            passages = [kvc.PassageKV(p.keys, p.values, torch.arange(p.kept, device=p.offsets.device).expand_as(p.offsets),
                                      p.n_tokens) for p in passages]
        start = prefix[0][0].shape[2]
        starts = []
        for p in passages:
            starts.append(start)
            start += p.n_tokens if params.positions == "original" else p.kept
        return kvc.placed_layers(lm, prefix, passages, starts), start

    def _context(self, question, corpus, params) -> "_Context":
        lm = corpus.lm
        corpus.require_documents(self.name)
        hits, retrieve_s = corpus.retrieve_in_order(question, params.k)
        load_start = time.perf_counter()
        had_prefix = prefix_cache(lm).has(lm, instruction_ids(lm))
        prefix_ids, prefix = self._prefix(lm)
        digest = self._artifact_hash(lm, params)
        passages, sizes, prepare_s = self._load_passages(corpus, lm, params, digest, hits)
        keep = [kvc.kept_share(p) for p in passages]  # before placing: compact positions renumber the offsets
        layers, next_pos = self._place(lm, prefix, passages, params)
        adapter = self._adapter(corpus, lm, params)
        passage_tokens = sum(p.n_tokens for p in passages)
        result = Result(self.name, retrieve_s=retrieve_s, prepare_s=prepare_s,
                        storage_bytes=sum(sizes) + len(adapter or b""),
                        chunk_bytes_per_token=per_token(sum(sizes), passage_tokens))
        if prepare_s:
            result.notes.append(f"chunk caches missing for these knobs were compressed now and stored "
                                f"({prepare_s:.2f} s, counted as prepare_s, not in load or TTFT)")
        if adapter:
            result.notes.append(f"collection LoRA applied ({fmt_bytes(len(adapter))})")
        kept = sum(p.kept for p in passages)
        result.notes.append(f"{kept} of {passage_tokens} passage tokens kept per layer/head "
                            f"(c={params.c}, {params.scorer}, {params.storage}); dimmed tokens were dropped")
        view = _View(question, hits, keep, had_prefix, params.c)
        return _Context(kvc.cache_from(layers), next_pos, question_ids(lm.tokenizer, question), view, result,
                        adapter, load_start, [p.kept for p in passages])

    @staticmethod
    def _marked_prompt(lm, view: "_View") -> Prompt:
        """What the model saw, for the prompt view and the token counts. Only the question's ids are needed to
        answer (the passages arrive as caches), so this tokenizes the passage text after the answer, not before
        its first token."""
        prompt = build_prompt(lm.tokenizer, view.question, view.hits)  # same token ids as the cached passages
        # the prefix counts as cached only when its states were read from the LM's prefix cache
        marked = [Segment("prefix", prompt.segments[0].ids, "cached" if view.had_prefix else "text")]
        for seg, hit, kept in zip(prompt.segments[1:-1], view.hits, view.keep):
            shares = kept.tolist()  # each token's share of the layers x KV heads that kept it: read from storage
            marked.append(Segment("passage", seg.ids, "compressed" if view.c > 1 else "cached",
                                  {"doc": hit["doc"], "chunk_id": hit["chunk_id"], "score": hit["score"]},
                                  keep=shares, processed=0.0, cached=float(sum(shares))))
        marked.append(prompt.segments[-1])
        return Prompt(marked)


@dataclass
class _View:
    """What the prompt view of an answer needs besides the model: built after the answer (`_marked_prompt`)."""

    question: str
    hits: list[dict]
    keep: list  # per passage, each token's kept share (torch tensors)
    had_prefix: bool
    c: int


@dataclass
class _Context:
    cache: object
    next_pos: int
    question_ids: list[int]
    view: _View
    result: Result
    adapter: object  # the stored LoRA (StoredArtifact) or None
    load_start: float
    kept_per_passage: list[int]


CAPTURE_MEMORY = 1 << 30  # bytes of uncompressed passage caches kept in memory


def _captures(lm):
    """Uncompressed caches and scores of recent chunks, remembered for a while: preparing c=2, 4 and 8 one after
    the other (the benchmark does) then runs each chunk through the model once instead of three times."""
    return lm_memo(lm, "lloco_captures", CAPTURE_MEMORY, lambda value: value[0].keys.nbytes * 2)


def _capture_key(lm, params, prefix_ids: list[int], chunk: dict) -> tuple:
    return lm.model_id, str(lm.dtype), params.scorer, tuple(prefix_ids), chunk_key(chunk["text"])


def _scores(result) -> torch.Tensor:
    """The chosen scorer's scores from a chunk's share of the shared pass: KVzip reconstruction scores when the
    pass computed them, else key norms (from the fp32 keys)."""
    return result.scores if result.scores is not None else kvc.keynorm_scores(result.kv)


def _half(full: kvc.PassageKV) -> kvc.PassageKV:
    """The full cache as kept in memory for another ratio: fp16, as it is stored anyway."""
    return kvc.PassageKV(full.keys.half(), full.values.half(), full.offsets, full.n_tokens)
