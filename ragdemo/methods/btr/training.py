"""What BTR trains: the distilled LoRA on the upper layers and its objectives (KL to the full model reading the
passages as text; optionally passage-state recovery, which also trains the decoder, and salient-token matching)."""
from __future__ import annotations

import dataclasses
import random

import torch

from ...engine.calibration import TrainableDecoder
from ...engine.layers import attention_from, positions
from ...engine.lora import (adapter_key, cloze_question, distill_kl, relative_mse, salient_tokens, teacher_logits,
                            teacher_run, train_adapter)
from ...engine.prefix import instruction_ids
from ...engine.prompt import lead_question_ids, passage_ids
from ...engine.prompt import question_ids as final_question_ids
from ...errors import UserError
from ...store import chunk_key
from .forward import btr_forward

RECIPE = "distill-v1"  # bump when the LoRA distillation recipe changes, so old adapters are not reused

# training objectives of the distilled LoRA (knob `objective`); "kl", the default, matches the outputs alone
KL, RECOVERY, SALIENT = "kl", "recovery", "salient"
OBJECTIVES = (KL, RECOVERY, SALIENT, f"{RECOVERY}+{SALIENT}")
RECOVERY_WEIGHT = 1.0  # recovery MSE (relative to the states' variance) next to the KL; both are O(0.1-1) at the start
SALIENT_FRACTION = 0.2  # passage tokens whose upper-layer states are matched: the top fifth by the question's attention
SALIENT_WEIGHT = 1.0  # that state match (relative MSE after the final norm) next to the KL


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


def distil_lora(btr, corpus, params, progress=None) -> str:
    """`Btr.finetune`: distil the full model into layers [split, L) with a LoRA: on cloze questions about the
    collection's own chunks, BTR (passages from decoded bits) learns to match the full model reading the same
    passages as text. The adapter (and a recovery-trained decoder) is stored where `btr` looks for it."""
    lm = corpus.lm
    btr._check(lm, params)
    if params.split >= lm.n_layers:
        raise UserError(f"btr: split={params.split} leaves no upper layers to fine-tune")
    codes_only = dataclasses.replace(params, train=False, r_o=0.0)  # distilled on unmerged codes
    btr.prepare(corpus, codes_only, (lambda f, m: progress(0.1 * f, m)) if progress else None)
    token_ids = {c["chunk_id"]: passage_ids(lm.tokenizer, c["text"]) for c in corpus.chunks()}
    chunks = [c for c in corpus.chunks() if len(token_ids[c["chunk_id"]]) >= 24]
    if len(chunks) < 2:
        raise UserError("btr fine-tuning needs at least 2 chunks of 24+ tokens in the collection")
    sig = corpus.store.content_signature(corpus.collection_id)
    loaded = btr._load_decoder(corpus, codes_only, sig)  # once, not per step
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
        codes = btr._artifacts(corpus, codes_only, picked, loaded, sig).codes
        asked = final_question_ids(lm.tokenizer, question)
        recovery = 0.0
        if trained is None:
            states = [torch.from_numpy(decoder.decode(codes[chunk_key(c["text"])])) for c in picked]
        else:
            true = [torch.from_numpy(btr._float_states(lm, params, c)) for c in picked]
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
    adapter_hash = btr._adapter_hash(lm, codes_only, decoder_blob)
    if trained is not None:  # before the adapter: an adapter stored means its decoder is there too
        corpus.store.put_artifact(btr.name, lm.model_id, adapter_hash, btr._decoder_key(sig),
                                  trained.frozen().to_bytes(), collection_id=corpus.collection_id, basis=sig)
    corpus.store.put_artifact(btr.name, lm.model_id, adapter_hash,
                              adapter_key(sig), training.blob, collection_id=corpus.collection_id, basis=sig,
                              meta={"loss_first": training.losses[0], "seconds": round(training.seconds, 1)})
    return training.summary(f"btr LoRA r={params.lora_r} on layers [{params.split}, {lm.n_layers}) distilled "
                            f"on {len(chunks)} chunks")
