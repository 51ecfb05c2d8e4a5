"""BTR as a method: its knobs, the offline step (the layer-`split` states of every chunk, binarized around a
calibration decoder), and answers that decode the retrieved chunks' codes and run only the upper layers over them."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...engine.binary import (FLOAT_BITS, SUPPORTED_BITS, check_bits, fp16_kv_bytes_per_token,
                              fp16_state_bytes_per_token)
from ...engine.calibration import Decoder
from ...engine.generate import decode_loop
from ...engine.layers import require_llama_like
from ...engine.lora import LoraKnobs, adapter_key, applied_adapter
from ...engine.memo import lm_memo
from ...engine.prefix import instruction_ids, shared_prefix
from ...engine.prepare_pass import Needs
from ...engine.prompt import Segment, build_prompt, lead_question_ids
from ...engine.scoring import answer_ids, mean_nll
from ...errors import UserError
from ...params import out_of_range
from ...store import ArtifactRow, artifact_hash, chunk_key
from ...units import fmt_bytes
from ..base import Method, Params, Result, StorageAccount, answer_clock, finish, knob, load_seconds, per_token
from ..preparation import PassJob, run_jobs, unique_chunks
from .artifacts import STATE_MEMORY, BtrArtifacts, _Read
from .forward import EVERY, ONCE, Forward, btr_forward, decode_step
from .training import KL, OBJECTIVES, RECOVERY, distil_lora


@dataclass
class BtrParams(LoraKnobs, Params):
    k: int = knob(5, "chunks retrieved, as in rag (NOT the paper's k, which is its layer split: `split` here)",
                  label="chunks retrieved", min=1, max=500)
    split: int = knob(18, "layers [0, split) run offline per passage; [split, L) at query time (the paper's k); at "
                         "most the model's layer count", label="layer split", min=0, max=255)
    bits: int = knob(1, "1, 2, 4, 8: a uniform b-bit grid per dimension + one fp16 step per token; 16 = fp16 states",
                     label="bits per value", choices=SUPPORTED_BITS)
    calibrate: bool = knob(True, "learned channel centre + least-squares bits->state decoder")
    after_prefix: bool = knob(True, "passages see the shared instruction prefix in layers [0, split)")
    # split 18 + query_aware: a point on the measured quality/speed frontier (how it was chosen: the card)
    query_aware: bool = knob(True, "upper layers read [prefix, question, passages, question]: passages see the "
                                   "question")
    r_o: float = knob(0.0, "offline merging (paper Algorithm 1, bits=1): fraction of each token's occurrences folded",
                      label="offline merge share", min=0, max=0.5)
    r_p: float = knob(0.0, "runtime ToMe merging: fraction of passage tokens folded away (per layer with "
                           "merge_mode=every)", label="runtime merge share", min=0, max=0.5)
    merge_layer: int = knob(-1, "layer where runtime merging starts; -1 = at the split", label="merge layer", min=-1,
                            max=255)
    merge_mode: str = knob(ONCE, "once: one fold at merge_layer over all passages; every: per passage before each "
                                 "layer", choices=(ONCE, EVERY))
    lora_steps: int = knob(120, "distillation steps of the optional LoRA on layers [split, L)", label="LoRA steps",
                           min=1, max=20000)
    objective: str = knob(KL, "what the LoRA (and decoder) train on", choices=OBJECTIVES)


class Btr(BtrArtifacts, Method):
    name = "btr"
    label = "BTR (binary token representations)"
    order = 6
    Params = BtrParams
    has_prepare = True
    has_finetune = True

    # ----------------------------------------------------------------------------------------- knobs
    def check_knobs(self, params, lm) -> None:
        """The bounds that need the model, and the knobs that only work together (the rest is on BtrParams)."""
        if params.split > lm.n_layers:
            raise out_of_range(params, "split", f"a whole number from 0 to {lm.n_layers} for this model", self.name)
        if params.merge_layer >= lm.n_layers:
            raise out_of_range(params, "merge_layer", f"-1 (the split) or a layer below {lm.n_layers} for this model",
                               self.name)
        if params.r_o > 0 and params.bits != 1:
            raise UserError(f"btr.r_o (offline merging) works on 1-bit codes only, as in the paper: set btr.bits=1 "
                            f"(got bits={params.bits})")
        if RECOVERY in params.objective and (not params.calibrate or params.bits == FLOAT_BITS):
            raise UserError(f"btr.objective={params.objective} trains the calibration decoder: it needs btr.calibrate "
                            f"on and btr.bits below 16")

    def _check(self, lm, params) -> None:
        require_llama_like(lm, self.name)
        check_bits(params.bits)
        self.check_knobs(params, lm)

    # --------------------------------------------------------------------------------------- prepare
    def prepare(self, corpus, params, progress=None) -> None:
        run_jobs(corpus, [self.pass_job(corpus, params)], progress)
        lm, store = corpus.lm, corpus.store
        say = progress or (lambda f, m: None)
        chunks = corpus.chunks()
        sig = store.content_signature(corpus.collection_id)
        _, decoder_blob = self._load_decoder(corpus, params, sig)
        if params.r_o > 0:
            self._compress(corpus, params, self._chunk_hash(lm, params, decoder_blob), chunks, sig, say)
        say(1.0, f"{len(chunks)} chunks ready")
        if params.train and params.lora and self._adapter(corpus, params, decoder_blob, sig) is None:
            self.finetune(corpus, params, progress)

    def pass_job(self, corpus, params) -> PassJob | None:
        """What the collection still lacks at these knobs, as a job for the shared pass: the layer-`split` states
        of the chunks without codes, or of every chunk when the calibration decoder is not fitted yet (it is fitted
        on all of them, in `finish`). States still in memory (an earlier prepare at another `bits`) skip the
        forward. None when every chunk has its codes."""
        lm, store = corpus.lm, corpus.store
        self._check(lm, params)
        corpus.require_documents(self.name)
        chunks = unique_chunks(corpus.chunks())
        sig = store.content_signature(corpus.collection_id)
        decoder, decoder_blob = self._load_decoder(corpus, params, sig)
        if decoder is not None:
            have = store.artifact_keys(self.name, lm.model_id, self._chunk_hash(lm, params, decoder_blob),
                                       [chunk_key(c["text"]) for c in chunks])
            chunks = [c for c in chunks if chunk_key(c["text"]) not in have]
        if not chunks:
            return None
        prefix = instruction_ids(lm) if params.after_prefix else []
        memo = lm_memo(lm, "btr_lower_states", STATE_MEMORY, lambda value: value.nbytes)
        # held here, not only in the memo: the pass's own states may push the older ones out before `finish`
        states = {chunk_key(c["text"]): memo.get(self._state_key(lm, params, c), lambda: None) for c in chunks
                  if self._state_key(lm, params, c) in memo}
        remembered = list(states)

        def take(batch: list[dict], results: list) -> list[ArtifactRow]:
            for chunk, result in zip(batch, results):
                state = result.states[params.split].cpu().numpy()
                states[chunk_key(chunk["text"])] = memo.get(self._state_key(lm, params, chunk), lambda: state)
            # codes right away when the decoder exists; else `finish` fits it on every chunk's states first
            return self._code_rows(corpus, params, decoder, decoder_blob, sig, batch, states) if decoder is not None else []

        def finish(progress) -> list[ArtifactRow]:
            rows = []
            fitted, fitted_blob = decoder, decoder_blob
            if fitted is None:
                rows.append(self._fit(corpus, params, sig, [states[chunk_key(c["text"])] for c in chunks], progress))
                fitted_blob = rows[0].blob
                fitted = Decoder.from_bytes(fitted_blob)  # encode around the stored (fp16) centre, as answers decode
                todo = chunks
            else:
                todo = [c for c in chunks if chunk_key(c["text"]) in remembered]
            progress(0.5, f"binarizing {len(todo)} chunks ({params.bits} bit)")
            return rows + self._code_rows(corpus, params, fitted, fitted_blob, sig, todo, states)

        fresh = [c for c in chunks if chunk_key(c["text"]) not in states]
        needs = Needs(states_at=frozenset({params.split}))
        return PassJob(f"btr (split {params.split}, {params.bits} bit)", needs, prefix, fresh, take,
                       finish if decoder is None or remembered else None)

    def storage(self, corpus, params) -> StorageAccount:
        """Everything BTR keeps for the collection at these knobs: each chunk's codes (or merged code indices),
        and the collection's decoder, codebook and distilled LoRA."""
        lm, store = corpus.lm, corpus.store
        sig = store.content_signature(corpus.collection_id)
        _, decoder_blob = self._load_decoder(corpus, params, sig)
        stored = self._stored_hash(lm, params, decoder_blob, sig)
        shared = {"decoder": (artifact_hash(self._base_hash(lm, params)), self._decoder_key(sig)),
                  "codebook": (stored, f"codebook:{sig}")}
        if params.lora:
            shared["adapter"] = (self._adapter_hash(lm, params, decoder_blob), adapter_key(sig))
            if RECOVERY in params.objective:
                shared["trained decoder"] = (self._adapter_hash(lm, params, decoder_blob), self._decoder_key(sig))
        chunk_bytes, shared_bytes = store.artifact_account(corpus.collection_id, self.name, lm.model_id, stored, shared)
        return StorageAccount(chunk_bytes, shared_bytes, corpus.n_tokens())

    def finetune(self, corpus, params, progress=None) -> str:
        """The distilled LoRA on layers [split, L) (training.py)."""
        return distil_lora(self, corpus, params, progress)

    # ---------------------------------------------------------------------------------------- query
    def _load(self, corpus, params, hits) -> tuple[list[torch.Tensor], _Read, list[str], float]:
        """Decoded passage states for `hits`, preparing the collection first when artifacts are missing (that
        time is returned apart, as prepare_s)."""
        notes, prepare_s = [], 0.0
        read = self._artifacts(corpus, params, hits)
        # the whole collection, not stored_or_built's missing chunks alone: codes need a decoder fitted on every chunk
        if read.decoder is None or any(chunk_key(h["text"]) not in read.codes for h in hits):
            corpus.refuse_collection_prepare_when_shared(self.name, "the decoder and codes are")
            started = time.perf_counter()
            self.prepare(corpus, params)
            prepare_s = time.perf_counter() - started
            notes.append(f"btr artifacts were missing for these knobs: prepared the collection first "
                         f"({prepare_s:.2f} s, counted as prepare_s, not in load or TTFT)")
            read = self._artifacts(corpus, params, hits)
        decoder = self._trained_decoder(corpus, params, read) or read.decoder
        if decoder is not read.decoder:
            notes.append("the decoder trained with the LoRA (objective=recovery) decodes the passages")
        states = [torch.from_numpy(decoder.decode(read.codes[chunk_key(hit["text"])])) for hit in hits]
        if params.r_o > 0:
            notes.append(f"offline-merged codes (r_o={params.r_o}): the collection's codebook is read whole")
        return states, read, notes, prepare_s

    def _plan(self, question, corpus, params):
        """Retrieve, load and decode; the prompt lists each chunk as its own passage in document order."""
        lm = corpus.lm
        self._check(lm, params)
        corpus.require_documents(self.name)
        hits, retrieve_s = corpus.retrieve_in_order(question, params.k)
        prompt = build_prompt(lm.tokenizer, question, hits)
        if params.query_aware:  # the question's first copy, right after the instruction prefix
            prompt.segments.insert(1, Segment("question", lead_question_ids(lm.tokenizer, question)))
        started = time.perf_counter()
        states, read, notes, prepare_s = self._load(corpus, params, hits)
        adapter = self._adapter(corpus, params, read.decoder_blob, read.sig)
        if adapter:
            notes.append(f"distilled LoRA on layers [{params.split}, {lm.n_layers}) applied ({fmt_bytes(len(adapter))})")
        passages = [s for s in prompt.segments if s.kind == "passage"]
        for seg, state in zip(passages, states):
            if len(seg.ids) != len(state):
                raise UserError("btr: stored states do not match the chunk's tokens; run prepare again")
            seg.mark = "cached" if params.bits == FLOAT_BITS else "binarized"
        if not params.after_prefix:
            notes.append("passages were encoded without the instruction prefix")
        result = Result(self.name, retrieve_s=retrieve_s, load_s=load_seconds(started, prepare_s),
                        prepare_s=prepare_s, notes=notes,
                        storage_bytes=(read.chunk_bytes + read.codebook_bytes + len(read.decoder_blob or b"")
                                       + read.trained_bytes + len(adapter or b"")),
                        chunk_bytes_per_token=per_token(read.chunk_bytes, sum(len(s) for s in states)))
        return _Plan(prompt, states, result, adapter)

    @staticmethod
    def _query_side(prompt) -> tuple[list[int], list[int], list[int]]:
        """(instruction prefix, question copy before the passages or [], question) of a planned prompt."""
        lead = prompt.segments[1].ids if prompt.segments[1].kind == "question" else []
        return prompt.segments[0].ids, lead, prompt.segments[-1].ids

    def answer(self, question, corpus, params, stream=None) -> Result:
        t0 = time.perf_counter()
        lm = corpus.lm
        plan = self._plan(question, corpus, params)
        prompt, states, result = plan.prompt, plan.states, plan.result
        prefix, lead, asked = self._query_side(prompt)
        clock = answer_clock(t0, result.prepare_s)  # preparation is not answering: TTFT and total skip it
        switch = time.perf_counter()
        with applied_adapter(lm, plan.adapter):
            result.load_s += time.perf_counter() - switch  # adapter switching is loading, as for every method
            shared = shared_prefix(lm, prefix)  # inside the adapter: a LoRA changes the prefix's upper layers too
            with torch.inference_mode():
                fwd = btr_forward(lm, prefix, states, asked, params.split, 1, params.r_p, params.merge_layer,
                                  prefix=shared.layers, lead_ids=lead, merge_mode=params.merge_mode)
            generation = decode_loop(lm, fwd.cache, fwd.logits, fwd.next_pos, params.max_new_tokens, clock, stream,
                                     step=decode_step(lm, fwd.key_bias))
        passage_tokens = sum(len(s) for s in states)
        if not shared.fresh:
            prompt.segments[0].mark = "cached"
        self._mark_layers(prompt, fwd, params.split, lm.n_layers)
        finish(result, lm, prompt, generation, clock)
        if fwd.removed:
            how = (f"{params.r_p:g} of each passage's remaining tokens before every layer from {fwd.merge_at}, "
                   "with proportional attention" if params.merge_mode == EVERY else f"once, at layer {fwd.merge_at}")
            result.notes.append(f"runtime merging folded {fwd.removed} of {passage_tokens} passage tokens by the "
                                f"last layer ({how})")
        if lead:
            result.notes.append(f"query-aware: passages attend to a copy of the question in layers "
                                f"[{params.split}, {lm.n_layers}); their stored lower-layer states stay query-agnostic")
        self._storage_notes(result, self.storage(corpus, params), lm.model.config, params.split)
        return result

    @staticmethod
    def _mark_layers(prompt, fwd: Forward, split: int, n_layers: int) -> None:
        """Each passage: layers [0, split) read from its stored states, the upper layers computed now (fewer
        token-layers where merging folded tokens away). Query-side segments ran every layer."""
        passages = [s for s in prompt.segments if s.kind == "passage"]
        for segment, upper in zip(passages, fwd.passage_layers):
            segment.processed = upper / n_layers
            segment.cached = len(segment.ids) * split / n_layers
            if fwd.removed:
                segment.mark = "merged"

    @staticmethod
    def _storage_notes(result: Result, account: StorageAccount, config, split: int) -> None:
        """The headline ratio uses the amortised figure, everything counted; the per-chunk one is labelled."""
        result.bytes_per_token = per_token(account.total, account.tokens)
        kv, state = fp16_kv_bytes_per_token(config), fp16_state_bytes_per_token(config)
        parts = ", ".join(f"{name} {fmt_bytes(size)}" for name, size in account.shared.items())
        result.notes.append(
            f"{account.bytes_per_token:.1f} B per collection token, everything counted (codes {fmt_bytes(account.chunk_bytes)}"
            f"{', ' + parts if parts else ''}; {account.tokens:,} tokens): {kv / max(account.bytes_per_token, 1e-9):.0f}x "
            f"smaller than an fp16 KV cache ({kv:,} B per token)")
        result.notes.append(
            f"per-chunk codes alone: {result.chunk_bytes_per_token:.1f} B per passage token "
            f"({kv / max(result.chunk_bytes_per_token, 1e-9):.0f}x smaller than fp16 KV, "
            f"{state / max(result.chunk_bytes_per_token, 1e-9):.1f}x smaller than fp16 layer-{split} states)")

    def nll(self, question, gold, corpus, params) -> float:
        """Teacher-forced: gold tokens join the question on the query side, exactly as generated tokens would
        (they run the lower layers without the passages, the upper layers with everything)."""
        lm = corpus.lm
        plan = self._plan(question, corpus, params)
        prefix, lead, asked = self._query_side(plan.prompt)
        target = answer_ids(lm.tokenizer, gold)
        with applied_adapter(lm, plan.adapter), torch.inference_mode():
            fwd = btr_forward(lm, prefix, plan.states, asked + target, params.split, len(target) + 1,
                              params.r_p, params.merge_layer, lead_ids=lead, merge_mode=params.merge_mode)
        return mean_nll(fwd.logits, target)


@dataclass
class _Plan:
    """What an answer over retrieved chunks reads: the prompt layout, the decoded states, the Result so far (with
    the stored bytes read) and the distilled LoRA."""

    prompt: object
    states: list[torch.Tensor]
    result: Result
    adapter: object  # the stored LoRA (StoredArtifact) or None
