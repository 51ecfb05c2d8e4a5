"""BTR (Cao et al., ICLR 2024), adapted to a decoder-only LM: passages' lower-layer states are computed
offline, binarized and stored; at query time only the upper layers see them."""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from transformers import DynamicCache

from ..engine.binary import (FLOAT_BITS, SUPPORTED_BITS, Codes, check_bits, encode_many, fp16_kv_bytes_per_token,
                             fp16_state_bytes_per_token, from_blob, to_blob)
from ..engine.calibration import Decoder, TrainableDecoder, fit_decoder, identity_decoder
from ..engine.generate import decode_loop
from ..engine.kv import cache_from
from ..engine.prefix import instruction_ids, shared_prefix
from ..engine.layers import CAUSAL, attention_from, embed, logits, positions, require_llama_like, run_layers
from ..engine.lora import (LoraKnobs, adapter_key, applied_adapter, cloze_question, distill_kl, relative_mse,
                           salient_tokens, teacher_logits, teacher_run, train_adapter)
from ..engine.memo import lm_memo
from ..engine.merging import bipartite_merge, merge_by_token, merge_within_groups, sized
from ..engine.prepare_pass import Needs, forward_chunks
from ..engine.prompt import Segment, build_prompt, lead_question_ids, passage_ids
from ..engine.prompt import question_ids as final_question_ids
from ..engine.scoring import answer_ids, mean_nll
from ..errors import UserError
from ..params import out_of_range
from ..store import ArtifactRow, artifact_hash, chunk_key
from ..units import fmt_bytes
from .base import Params, Method, Result, StorageAccount, finish, knob
from .preparation import PassJob, run_jobs, unique_chunks

FORMAT_VERSION = 3  # 3: fp16 decoder, content-keyed artifacts; bump when the artifact layout or the way states are computed changes
RECIPE = "distill-v1"  # bump when the LoRA distillation recipe changes, so old adapters are not reused


ONCE, EVERY = "once", "every"  # runtime merging: one fold at merge_layer, or a ToMe step before every layer from it

# training objectives of the distilled LoRA (knob `objective`); "kl" is the original recipe
KL, RECOVERY, SALIENT = "kl", "recovery", "salient"
OBJECTIVES = (KL, RECOVERY, SALIENT, f"{RECOVERY}+{SALIENT}")
RECOVERY_WEIGHT = 1.0  # recovery MSE (relative to the states' variance) next to the KL; both are O(0.1-1) at the start
SALIENT_FRACTION = 0.2  # passage tokens whose upper-layer states are matched: the top fifth by the question's attention
SALIENT_WEIGHT = 1.0  # that state match (relative MSE after the final norm) next to the KL


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


@dataclass
class Forward:
    """What a BTR prefill produced: logits for the wanted positions, the per-layer cache, and counts."""

    logits: torch.Tensor
    cache: DynamicCache
    next_pos: int
    token_layers: float  # token x layer products computed at query time
    removed: int  # passage tokens merged away by the last layer
    merge_at: int = 0  # the layer where runtime merging started
    removed_at_split: int = 0  # passage tokens already gone when the first upper layer ran (its window is widest)
    key_bias: dict = dataclasses.field(default_factory=dict)  # {layer: log sizes of its cached keys}, for decoding
    hidden: torch.Tensor | None = None  # last layer's output over [lead, passages (merged), question], pre-norm
    passage_layers: list[int] = dataclasses.field(default_factory=list)  # per passage, token x layer products
    #                                                 computed in the upper layers (fewer where merging folded tokens)


# ----------------------------------------------------------------------------------------------- forward

def lower_states(lm, prefix_ids: list[int], ids: list[int], split: int) -> torch.Tensor:
    """A passage's layer-`split` states, computed with only the instruction prefix before it (or nothing): the
    shared preparation pass over one chunk."""
    prefix = shared_prefix(lm, prefix_ids) if prefix_ids else None
    (out,) = forward_chunks(lm, prefix, [list(ids)], Needs(states_at=frozenset({split})))
    return out.states[split]


def btr_forward(lm, prefix_ids: list[int], passages: list[torch.Tensor], question_ids: list[int], split: int,
                want: int = 1, r_p: float = 0.0, merge_layer: int | None = None, prefix=None,
                lead_ids: list[int] | None = None, merge_mode: str = ONCE) -> Forward:
    """Prefill [prefix, lead, passages, question] where passages arrive as layer-`split` states.

    `lead_ids` (query-aware layout: a copy of the question before the passages) is empty by default.
    The prefix comes first and sees only itself, so its keys and values in every layer are those of the prefix
    read alone: `prefix` passes them in (from the LM's prefix cache), otherwise they are computed here.
    Layers [0, split): the query side alone (lead, then question, after the prefix, at their final positions so
    RoPE distances match). Layers [split, L): lead, passages and question jointly under one causal mask, so
    passages attend to the lead; runtime merging of passage tokens from `merge_layer` on. The cache then holds
    only query-side keys below the split and all keys above it, which is exactly what generated tokens may attend
    to. Returns logits of the last `want` positions.
    """
    n_layers = lm.n_layers
    device, dtype = lm.device, lm.model.dtype
    lead = list(lead_ids or [])
    p, a, q = len(prefix_ids), len(lead), len(question_ids)
    n = sum(len(s) for s in passages)
    cache = cache_from(prefix) if prefix is not None else DynamicCache()
    computed = 0 if prefix is not None or p == 0 else p
    if computed:
        run_layers(lm, embed(lm, torch.tensor([prefix_ids], device=device)), 0, n_layers, positions(0, p, device),
                   CAUSAL, cache)
    lower = _lower_query(lm, [(lead, p), (list(question_ids), p + a + n)], split, cache)
    h = torch.cat([lower[:, :a]] + [s.to(device, dtype).unsqueeze(0) for s in passages] + [lower[:, a:]], dim=1)
    pos = positions(p, a + n + q, device)
    merge_at = split if merge_layer is None or merge_layer < 0 else max(split, min(merge_layer, n_layers))
    h = run_layers(lm, h, split, merge_at, pos, CAUSAL, cache)
    upper = _merge_every(lm, h, pos, passages, a, merge_at, r_p, cache) if merge_mode == EVERY \
        else _merge_once(lm, h, pos, a, [len(s) for s in passages], merge_at, r_p, cache)
    per_passage = [len(s) * (merge_at - split) + merged for s, merged in zip(passages, upper.passage_layers)]
    token_layers = (computed + a + q) * n_layers + sum(per_passage)
    removed_at_split = upper.removed_first if merge_at == split else 0
    return Forward(logits(lm, upper.hidden[:, -want:]), cache, p + a + n + q, token_layers, upper.removed, merge_at,
                   removed_at_split, upper.key_bias, upper.hidden, per_passage)


def _lower_query(lm, pieces: list[tuple[list[int], int]], split: int, cache) -> torch.Tensor:
    """Query-side pieces (ids, first position) through layers [0, split), each at its final positions, causal in
    order after what the cache holds (the question sees the lead, as if run after it). One call for all pieces:
    a short prefill costs mostly the reading of each layer's weights, so two calls would read them twice."""
    ids = [i for piece, _ in pieces for i in piece]
    pos = torch.cat([positions(start, len(piece), lm.device) for piece, start in pieces], dim=1)
    return run_layers(lm, embed(lm, torch.tensor([ids], device=lm.device)), 0, split, pos, CAUSAL, cache)


@dataclass
class _Upper:
    """Layers [merge_at, L) run: final states, passage token x layer products, tokens removed (in all and by the
    first merge), and the proportional-attention key bias per layer."""

    hidden: torch.Tensor
    passage_layers: list[int]  # per passage, its token x layer products in layers [merge_at, L)
    removed: int
    removed_first: int
    key_bias: dict


def _merge_once(lm, h, pos, a: int, lengths: list[int], merge_at: int, r_p: float, cache) -> _Upper:
    """merge_mode=once (the earlier figures): one bipartite fold over all passage tokens at `merge_at`, plain
    attention."""
    n = sum(lengths)
    merged = bipartite_merge(h, pos, torch.arange(a, a + n, device=h.device), r_p)
    hidden = run_layers(lm, merged.hidden, merge_at, lm.n_layers, merged.pos, CAUSAL, cache)
    ends = torch.tensor(lengths, device=h.device).cumsum(0) + a
    owner = torch.bucketize(merged.keep, ends, right=True)  # which passage each surviving row belongs to
    in_passages = (merged.keep >= a) & (merged.keep < a + n)
    kept = torch.bincount(owner[in_passages], minlength=len(lengths)).tolist()
    return _Upper(hidden, [k * (lm.n_layers - merge_at) for k in kept], merged.removed, merged.removed, {})


def _merge_every(lm, h, pos, passages, a: int, merge_at: int, r_p: float, cache) -> _Upper:
    """ToMe in every layer from `merge_at`: before each layer, fold r_p of each passage's remaining tokens within
    that passage, then run the layer with log(size) added to the merged keys' logits (proportional attention)."""
    lengths = torch.tensor([len(s) for s in passages], device=h.device)
    group = torch.cat([torch.full((a,), -1, device=h.device),
                       torch.repeat_interleave(torch.arange(len(passages), device=h.device), lengths),
                       torch.full((h.shape[1] - a - int(lengths.sum()),), -1, device=h.device)]).long()
    tokens = sized(h, pos, group)
    removed, first, key_bias = 0, 0, {}
    passage_layers = torch.zeros(len(passages), dtype=torch.long, device=h.device)
    for layer in range(merge_at, lm.n_layers):
        tokens, folded = merge_within_groups(tokens, r_p)
        removed += folded
        first = folded if layer == merge_at else first
        passage_layers += torch.bincount(tokens.group[tokens.group >= 0], minlength=len(passages))
        bias = None
        if removed:
            bias = {layer: torch.cat([torch.zeros(cache.get_seq_length(layer), device=h.device), tokens.log_size()])}
            key_bias.update(bias)
        hidden = run_layers(lm, tokens.hidden, layer, layer + 1, tokens.pos, CAUSAL, cache, bias)
        tokens = dataclasses.replace(tokens, hidden=hidden)
    return _Upper(tokens.hidden, passage_layers.tolist(), removed, first, key_bias)


def decode_step(lm, key_bias: dict | None = None):
    """One generated token: every layer in one pass; a single query with no mask attends to each layer's
    whole cache, which below the split is query-side only. `key_bias` keeps merged keys weighted by their size."""
    def step(ids, pos, cache):
        h = run_layers(lm, embed(lm, ids), 0, lm.n_layers, positions(pos, 1, lm.device), None, cache, key_bias)
        return logits(lm, h)
    return step


def distill_loss(lm, teacher_off, prefix_ids: list[int], passage_ids: list[list[int]], states: list[torch.Tensor],
                 query_ids: list[int], split: int, lead_ids: list[int] = ()) -> torch.Tensor:
    """KL(full model reading the passages as text || BTR reading them from decoded bits), at every query-side
    position, both in the same layout (`lead_ids`: the question copy before the passages, when query-aware)."""
    teacher = teacher_logits(lm, teacher_off, prefix_ids, passage_ids, query_ids, lead_ids)
    student = btr_forward(lm, prefix_ids, states, query_ids, split, len(query_ids), lead_ids=list(lead_ids))
    return distill_kl(student.logits[0], teacher)


def salient_distill_loss(lm, teacher_off, prefix_ids: list[int], passage_ids: list[list[int]],
                         states: list[torch.Tensor], query_ids: list[int], split: int, lead_ids: list[int] = (),
                         asked: int | None = None, fraction: float = SALIENT_FRACTION) -> torch.Tensor:
    """`distill_loss` + query-aware distillation on the most salient passage tokens (the paper's second
    objective): the student's last-layer passage states (after the final norm) match the teacher's on the
    top `fraction` of passage tokens, ranked by the teacher's attention from the first `asked` query tokens
    (the question, without the answer), averaged over heads, those tokens and the upper layers [split, L)."""
    teacher, inputs, teacher_out = teacher_run(lm, teacher_off, prefix_ids, passage_ids, query_ids, lead_ids,
                                               range(split, lm.n_layers))
    start, n = len(prefix_ids) + len(lead_ids), sum(map(len, passage_ids))
    picked = salient_tokens(passage_saliency(lm, teacher_off, inputs, start, n, asked or len(query_ids)), fraction)
    student = btr_forward(lm, prefix_ids, states, query_ids, split, len(query_ids), lead_ids=list(lead_ids))
    norm = lm.model.model.norm
    mine = norm(student.hidden[0, len(lead_ids):len(lead_ids) + n][picked])
    with torch.no_grad():
        target = norm(teacher_out[0, start:start + n][picked])
    return distill_kl(student.logits[0], teacher) + SALIENT_WEIGHT * relative_mse(mine, target)


def passage_saliency(lm, teacher_off, inputs: dict, start: int, n: int, asked: int) -> torch.Tensor:
    """[n] mean attention the question's tokens (right after the passages) pay each passage token in the given
    layers, recomputed from the teacher's layer inputs with the adapter off. Without the query-aware layout the
    passages' own states never saw the question, but the question still attends to them: the ranking is
    query-aware, the matched states are not."""
    rows = slice(start + n, start + n + asked)
    with torch.no_grad(), teacher_off():
        per_layer = [attention_from(lm, h, layer, positions(0, h.shape[1], lm.device), rows)[..., start:start + n]
                     for layer, h in inputs.items()]
    return torch.stack(per_layer).mean(dim=(0, 1, 2))


# -------------------------------------------------------------------------------------------- artifacts

STOPWORDS = set("""a an and are as at be been but by for from had has have he her his i in is it its of on or
that the their them they this to was were which who will with not no so than then there these those we you
your our she him also into about over after before such can could would should may might do does did""".split())


def stopword_ids(tokenizer, token_ids: np.ndarray) -> set[int]:
    """Tokens that carry little passage-specific meaning: English stopwords and pure punctuation/space."""
    found = set()
    for token in np.unique(token_ids):
        text = tokenizer.decode([int(token)]).strip().lower()
        if text in STOPWORDS or not any(ch.isalnum() for ch in text):
            found.add(int(token))
    return found


def _parsed_decoder(blob: bytes) -> tuple[Decoder, bytes]:
    return Decoder.from_bytes(blob), blob


def _blob_digest(lm, blob: bytes | None) -> str | None:
    """artifact_hash of a decoder blob, remembered: several keys per answer name it. The memo is keyed by the
    bytes themselves, and Python keeps a bytes object's hash, so the decoder memo's own blob is looked up
    without hashing 1.3 MB again."""
    if not blob:
        return None
    return lm_memo(lm, "btr_decoder_digests", 8).get(blob, lambda: artifact_hash(blob))


DECODER_MEMORY = 64 << 20  # bytes of parsed decoders kept between answers (a few collections' worth)
STATE_MEMORY = 1_500_000_000  # bytes of float lower-layer states kept between prepares (a bits/calibration sweep
# then reruns no lower layer)


class Btr(Method):
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

    def _base_hash(self, lm, params) -> dict:
        return {"v": FORMAT_VERSION, "split": params.split, "bits": params.bits, "calibrate": params.calibrate,
                "after_prefix": params.after_prefix, "prefix": artifact_hash(instruction_ids(lm)),
                "dtype": str(lm.dtype)}

    def _decoder_key(self, sig: str) -> str:
        return f"decoder:{sig}"

    def _load_decoder(self, corpus, params, sig: str) -> tuple[Decoder | None, bytes | None]:
        """The decoder fitted on the collection's current content (`sig`); (None, None) when not fitted yet.
        Read and parsed once per stored version (the LM's memo, keyed by the artifact's identity, so a refit
        under the same key is read again): every answer needs it, and it is 1.3 MB at d=576."""
        lm = corpus.lm
        if not params.calibrate:
            return identity_decoder(lm.model.config.hidden_size), None
        ref = corpus.store.artifact_ref(self.name, lm.model_id, artifact_hash(self._base_hash(lm, params)),
                                        self._decoder_key(sig))
        if ref is None:
            return None, None
        memo = lm_memo(lm, "btr_decoders", DECODER_MEMORY, lambda loaded: 3 * len(loaded[1]))
        return memo.get(ref.identity, lambda: _parsed_decoder(ref.read()))

    def _chunk_hash(self, lm, params, decoder_blob: bytes | None) -> str:
        """Codes are keyed by the least-squares decoder they were encoded around, also with objective=recovery:
        its trained decoder keeps that decoder's centre (the only part codes depend on) and learns the weight
        alone, so the same codes (and the merged codebook built from them) serve both; the trained decoder is
        keyed with its adapter (`_adapter_hash`, objective included)."""
        return artifact_hash({**self._base_hash(lm, params), "decoder": _blob_digest(lm, decoder_blob)})

    @staticmethod
    def _codes_basis(params, sig: str) -> str | None:
        """Codes encoded around a calibration decoder depend on the whole collection (it was fitted on it);
        without calibration they depend on their own chunk only."""
        return sig if params.calibrate else None

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

    def _fit(self, corpus, params, sig: str, states: list[np.ndarray], progress) -> ArtifactRow:
        """The collection's calibration decoder, fitted on every chunk's states (the previous content's decoder,
        codes and adapter were deleted when a document came or went)."""
        lm = corpus.lm
        started = time.perf_counter()
        progress(0.0, f"fitting the least-squares decoder on {sum(len(s) for s in states):,} tokens")
        blob = fit_decoder(states, params.bits).to_bytes()
        return ArtifactRow(self.name, lm.model_id, artifact_hash(self._base_hash(lm, params)), self._decoder_key(sig),
                           blob, collection_id=corpus.collection_id, basis=sig,
                           meta={"tokens": int(sum(len(s) for s in states)),
                                 "seconds": round(time.perf_counter() - started, 1)})

    def _code_rows(self, corpus, params, decoder, decoder_blob, sig: str, chunks: list[dict],
                   states: dict[str, np.ndarray]) -> list[ArtifactRow]:
        """Each chunk's codes around the decoder's centre, encoded in one vectorised call."""
        lm = corpus.lm
        chunk_hash = self._chunk_hash(lm, params, decoder_blob)
        basis = self._codes_basis(params, sig)
        all_codes = encode_many([states[chunk_key(c["text"])] for c in chunks], params.bits,
                                decoder.centre if params.calibrate else None)
        return [ArtifactRow(self.name, lm.model_id, chunk_hash, chunk_key(c["text"]), to_blob(codes),
                            chunk_id=c["chunk_id"], collection_id=corpus.collection_id if basis else None, basis=basis)
                for c, codes in zip(chunks, all_codes)]

    @staticmethod
    def _state_key(lm, params, chunk) -> tuple:
        """The memo key of a chunk's float states: its content, never its row id."""
        prefix = instruction_ids(lm) if params.after_prefix else []
        return lm.model_id, str(lm.dtype), params.split, artifact_hash(prefix), artifact_hash(chunk["text"].encode())

    def _float_states(self, lm, params, chunk) -> np.ndarray:
        """A chunk's float layer-`split` states, kept in the LM's memo between prepares and fine-tunes."""
        prefix = instruction_ids(lm) if params.after_prefix else []
        memo = lm_memo(lm, "btr_lower_states", STATE_MEMORY, lambda value: value.nbytes)
        return memo.get(self._state_key(lm, params, chunk),
                        lambda: lower_states(lm, prefix, passage_ids(lm.tokenizer, chunk["text"]), params.split).cpu().numpy())

    # -------------------------------------------------------------------------------------- finetune
    def finetune(self, corpus, params, progress=None) -> str:
        """Distil the full model into layers [split, L) with a LoRA: on cloze questions about the collection's own
        chunks, BTR (passages from decoded bits) learns to match the full model reading the same passages as text."""
        lm = corpus.lm
        self._check(lm, params)
        if params.split >= lm.n_layers:
            raise UserError(f"btr: split={params.split} leaves no upper layers to fine-tune")
        codes_only = dataclasses.replace(params, train=False, r_o=0.0)  # distilled on unmerged codes
        self.prepare(corpus, codes_only, (lambda f, m: progress(0.1 * f, m)) if progress else None)
        token_ids = {c["chunk_id"]: passage_ids(lm.tokenizer, c["text"]) for c in corpus.chunks()}
        chunks = [c for c in corpus.chunks() if len(token_ids[c["chunk_id"]]) >= 24]
        if len(chunks) < 2:
            raise UserError("btr fine-tuning needs at least 2 chunks of 24+ tokens in the collection")
        sig = corpus.store.content_signature(corpus.collection_id)
        loaded = self._load_decoder(corpus, codes_only, sig)  # once, not per step
        decoder, decoder_blob = loaded
        # recovery: the least-squares decoder becomes trainable and learns with the LoRA; it reads the very codes
        # answers read (the centre, the only part they depend on, stays fixed), through the STE quantiser. The
        # lower layers are frozen (their states are precomputed), so the STE's gradient stops at those states:
        # the decoder learns from the KL through the upper layers and from the recovery MSE
        trained = TrainableDecoder(decoder) if RECOVERY in params.objective else None
        prefix = instruction_ids(lm)
        rng = random.Random(0)

        def loss_of_step(peft_model, student):
            picked, question, target = cloze_question(lm.tokenizer, chunks, params.k, rng)
            lead = lead_question_ids(lm.tokenizer, question) if params.query_aware else []
            codes = self._artifacts(corpus, codes_only, picked, loaded, sig).codes
            asked = final_question_ids(lm.tokenizer, question)
            recovery = 0.0
            if trained is None:
                states = [torch.from_numpy(decoder.decode(codes[chunk_key(c["text"])])) for c in picked]
            else:
                true = [torch.from_numpy(self._float_states(lm, params, c)) for c in picked]
                states = [trained(codes[chunk_key(c["text"])], h) for c, h in zip(picked, true)]
                recovery = RECOVERY_WEIGHT * relative_mse(torch.cat(states), torch.cat(true))
            passage_ids = [token_ids[c["chunk_id"]] for c in picked]
            if SALIENT in params.objective:
                loss = salient_distill_loss(student, peft_model.disable_adapter, prefix, passage_ids, states,
                                            asked + target, params.split, lead, len(asked))
            else:
                loss = distill_loss(student, peft_model.disable_adapter, prefix, passage_ids, states, asked + target,
                                    params.split, lead)
            return loss + recovery

        training = train_adapter(lm, loss_of_step, params, (lambda f, m: progress(0.1 + 0.9 * f, m)) if progress else None,
                                 layers=list(range(params.split, lm.n_layers)),
                                 meta={"recipe": RECIPE, "split": params.split, "bits": params.bits,
                                       "query_aware": params.query_aware, "objective": params.objective},
                                 extra=[trained.delta] if trained is not None else [])
        adapter_hash = self._adapter_hash(lm, codes_only, decoder_blob)
        if trained is not None:  # before the adapter: an adapter stored means its decoder is there too
            corpus.store.put_artifact(self.name, lm.model_id, adapter_hash, self._decoder_key(sig),
                                      trained.frozen().to_bytes(), collection_id=corpus.collection_id, basis=sig)
        corpus.store.put_artifact(self.name, lm.model_id, adapter_hash,
                                  adapter_key(sig), training.blob, collection_id=corpus.collection_id, basis=sig,
                                  meta={"loss_first": training.losses[0], "seconds": round(training.seconds, 1)})
        return training.summary(f"btr LoRA r={params.lora_r} on layers [{params.split}, {lm.n_layers}) distilled "
                                f"on {len(chunks)} chunks")

    def _adapter_hash(self, lm, params, decoder_blob) -> str:
        layout = {"query_aware": True} if params.query_aware else {}  # today's adapters keep their keys
        if params.objective != KL:  # as do today's objective's; the trained decoder lives under this hash too
            layout["objective"] = params.objective
        return artifact_hash({"codes": self._chunk_hash(lm, params, decoder_blob), "k": params.k, "r": params.lora_r,
                              "steps": params.lora_steps, "lr": params.lora_lr, "recipe": RECIPE, **layout})

    def _adapter(self, corpus, params, decoder_blob, sig: str):
        """The LoRA distilled on the collection's current content for these knobs, when trained and wanted, as a
        stored reference (read only the first time it is switched on)."""
        if not params.lora:
            return None
        return corpus.store.artifact_ref(self.name, corpus.lm.model_id, self._adapter_hash(corpus.lm, params, decoder_blob),
                                         adapter_key(sig))

    @staticmethod
    def _merged_hash(chunk_hash: str, params, sig: str) -> str:
        """Merged code indices point into the collection's codebook, so they depend on the whole collection."""
        return artifact_hash({"codes": chunk_hash, "r_o": params.r_o, "collection": sig})

    def _compress(self, corpus, params, chunk_hash: str, chunks: list[dict], sig: str, say) -> None:
        """Paper Algorithm 1: one codebook of merged 1-bit codes for the collection, plus per chunk the index of
        each token's code. Stopwords (and punctuation) collapse to one code per vocabulary token."""
        lm, store = corpus.lm, corpus.store
        merged_hash = self._merged_hash(chunk_hash, params, sig)
        key = f"codebook:{sig}"
        if store.artifact_keys(self.name, lm.model_id, merged_hash, [key]):
            return  # written last, so its presence means every index is there too
        say(0.95, f"offline merging at r_o={params.r_o}")
        keys = [chunk_key(c["text"]) for c in chunks]
        blobs = store.get_artifacts(self.name, lm.model_id, chunk_hash, keys)
        all_codes = [from_blob(blobs[k]) for k in keys]
        token_ids = np.concatenate([passage_ids(lm.tokenizer, c["text"]) for c in chunks])
        packed = np.concatenate([c.planes[0] for c in all_codes])
        scales = np.concatenate([c.scales for c in all_codes])
        book = merge_by_token(token_ids, packed, scales, params.r_o, stopword_ids(lm.tokenizer, token_ids),
                              packed.shape[1] * 8)
        before = sum(len(b) for b in blobs.values())
        after = len(book.codes) * (book.codes.shape[1] + 2) + 4 * len(token_ids)
        say(0.97, f"offline merging: {len(token_ids)} codes -> {len(book.codes)} unique, ~{fmt_bytes(before)} -> ~{fmt_bytes(after)}")
        start = 0
        for chunk, codes in zip(chunks, all_codes):
            index = book.index[start:start + codes.n].astype("<u4")
            start += codes.n
            store.put_artifact(self.name, lm.model_id, merged_hash, chunk_key(chunk["text"]), index.tobytes(),
                               chunk_id=chunk["chunk_id"], collection_id=corpus.collection_id, basis=sig)
        store.put_artifact(self.name, lm.model_id, merged_hash, key,
                           st_save({"codes": book.codes, "scales": book.scales}), collection_id=corpus.collection_id,
                           basis=sig, meta={"before_bytes": int(before), "tokens": int(len(token_ids)),
                                            "codes_after": int(len(book.codes))})

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

    def _stored_hash(self, lm, params, decoder_blob, sig: str) -> str:
        """Params hash of what answers read: the chunk codes, or the merged indices when r_o > 0."""
        chunk_hash = self._chunk_hash(lm, params, decoder_blob)
        return self._merged_hash(chunk_hash, params, sig) if params.r_o > 0 else chunk_hash

    def _codebook_blob(self, corpus, params, decoder_blob, sig: str) -> bytes | None:
        if params.r_o <= 0:
            return None
        return corpus.store.get_artifact(self.name, corpus.lm.model_id, self._stored_hash(corpus.lm, params, decoder_blob, sig),
                                         f"codebook:{sig}")

    # ---------------------------------------------------------------------------------------- query
    def _artifacts(self, corpus, params, hits, loaded: tuple | None = None, sig: str | None = None) -> "_Read":
        """What answers over `hits` read; codes are missing where not prepared. `loaded`: a (decoder, blob) pair
        already read by the caller; `sig`: the collection's content signature, when the caller has it."""
        lm = corpus.lm
        sig = sig or corpus.store.content_signature(corpus.collection_id)
        decoder, decoder_blob = loaded or self._load_decoder(corpus, params, sig)
        if decoder is None:
            return _Read(None, None, {}, 0, 0, sig)
        blobs = corpus.store.get_artifacts(self.name, lm.model_id, self._stored_hash(lm, params, decoder_blob, sig),
                                           list({chunk_key(h["text"]) for h in hits}))
        nbytes = sum(len(b) for b in blobs.values())
        if params.r_o <= 0:
            return _Read(decoder, decoder_blob, {k: from_blob(b) for k, b in blobs.items()}, nbytes, 0, sig)
        book_blob = self._codebook_blob(corpus, params, decoder_blob, sig)
        if book_blob is None:
            return _Read(decoder, decoder_blob, {}, 0, 0, sig)
        book = st_load(book_blob)
        d = lm.model.config.hidden_size
        codes = {}
        for key, blob in blobs.items():
            index = np.frombuffer(blob, "<u4")
            codes[key] = Codes(len(index), d, 1, planes=book["codes"][index][None], scales=book["scales"][index])
        return _Read(decoder, decoder_blob, codes, nbytes, len(book_blob), sig)

    def _load(self, corpus, params, hits) -> tuple[list[torch.Tensor], "_Read", list[str], float]:
        """Decoded passage states for `hits`, preparing the collection first when artifacts are missing (that
        time is returned apart, as prepare_s)."""
        notes, prepare_s = [], 0.0
        read = self._artifacts(corpus, params, hits)
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

    def _trained_decoder_blob(self, corpus, params, decoder_blob: bytes | None, sig: str) -> bytes | None:
        """objective=recovery: the decoder trained jointly with the collection's adapter, stored beside it and
        used exactly when that adapter is (lora on and trained); otherwise None."""
        if RECOVERY not in params.objective or not params.lora or not params.calibrate:
            return None
        lm, store = corpus.lm, corpus.store
        where = self._adapter_hash(lm, params, decoder_blob)
        if not store.artifact_keys(self.name, lm.model_id, where, [adapter_key(sig)]):
            return None  # a fine-tune stopped between the two writes: the decoder alone is never used
        return store.get_artifact(self.name, lm.model_id, where, self._decoder_key(sig))

    def _trained_decoder(self, corpus, params, read: "_Read") -> Decoder | None:
        blob = self._trained_decoder_blob(corpus, params, read.decoder_blob, read.sig)
        read.trained_bytes = len(blob or b"")
        return Decoder.from_bytes(blob) if blob is not None else None

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
        result = Result(self.name, retrieve_s=retrieve_s, load_s=time.perf_counter() - started - prepare_s,
                        prepare_s=prepare_s, notes=notes)
        return _Plan(prompt, states, result, read.chunk_bytes + read.codebook_bytes,
                     len(read.decoder_blob or b"") + read.trained_bytes, adapter, read.chunk_bytes)

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
        clock = t0 + result.prepare_s  # preparation is not answering: TTFT and total skip it
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
        result.storage_bytes = plan.chunk_bytes + plan.decoder_bytes + len(plan.adapter or b"")
        result.chunk_bytes_per_token = round(plan.per_chunk_bytes / max(passage_tokens, 1), 2)
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
        result.bytes_per_token = round(account.bytes_per_token, 2)
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
    """What an answer over retrieved chunks reads: the prompt layout, decoded states, and stored byte counts."""

    prompt: object
    states: list[torch.Tensor]
    result: Result
    chunk_bytes: int  # per-chunk artifacts read, plus the codebook when codes are merged
    decoder_bytes: int
    adapter: object  # the stored LoRA (StoredArtifact) or None
    per_chunk_bytes: int = 0  # per-chunk artifacts alone


@dataclass
class _Read:
    """Stored artifacts read for some chunks: the decoder, {chunk_key: Codes}, and bytes read."""

    decoder: Decoder | None
    decoder_blob: bytes | None
    codes: dict
    chunk_bytes: int
    codebook_bytes: int
    sig: str
    trained_bytes: int = 0  # the recovery-trained decoder read besides the least-squares one

