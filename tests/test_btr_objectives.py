"""BTR's training objectives (issue 14, part 4): passage representation recovery (a decoder trained with a
straight-through quantiser jointly with the LoRA) and query-aware distillation on the most salient passage
tokens, as options beside today's KL recipe."""
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from ragdemo.engine import binary
from ragdemo.engine.calibration import Decoder, TrainableDecoder, fit_decoder, ste_features
from ragdemo.engine.layers import attention_from, embed, positions, run_layers
from ragdemo.engine.lora import applied_adapter, salient_tokens
from ragdemo.engine.scoring import answer_ids, mean_nll
from ragdemo.errors import UserError
from ragdemo.methods import get_method
from ragdemo.methods.btr import RECIPE, SALIENT_FRACTION, btr_forward, salient_distill_loss
from ragdemo.store import artifact_hash, chunk_key
from tests.test_btr_query_merge import btr_parts


# ------------------------------------------------------------------------------------------ STE decoder

def _states_and_codes(seed=0, n=50, d=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, :3] += 8.0
    fitted = Decoder.from_bytes(fit_decoder([x], 1).to_bytes())  # as stored: fp16-rounded centre and weight
    return x, fitted, binary.encode(x, 1, fitted.centre)


def test_ste_forward_is_the_stored_codes_decode_exactly_and_its_backward_the_clipped_identity():
    x, fitted, codes = _states_and_codes()
    codes = binary.from_blob(binary.to_blob(codes))  # what a stored chunk gives back
    states = torch.from_numpy(x).requires_grad_(True)
    decoded = TrainableDecoder(fitted)(codes, states)
    assert torch.equal(decoded.detach(), torch.from_numpy(fitted.decode(codes)))  # bit for bit
    feats = ste_features(states, codes, fitted.centre)
    d = codes.d
    feats[:, :d].sum().backward()
    assert torch.equal(states.grad, torch.ones_like(states))  # the reconstruction: identity
    states.grad = None
    ste_features(states, codes, fitted.centre)[:, d:2 * d].sum().backward()
    inside = np.abs(x - fitted.centre) <= codes.scales.astype(np.float32)[:, None]
    assert 0 < inside.mean() < 1 and torch.equal(states.grad, torch.from_numpy(inside.astype(np.float32)))


def test_trainable_decoder_learns_and_freezes_into_the_stored_format():
    x, fitted, codes = _states_and_codes(1)
    trained = TrainableDecoder(fitted)
    optimizer = torch.optim.Adam([trained.delta], lr=2e-2)
    target = torch.from_numpy(x) * 1.5  # a target the fit did not see: the decoder must move to follow it
    losses = []
    for _ in range(20):
        loss = ((trained(codes, torch.from_numpy(x)) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    frozen = trained.frozen()
    assert np.array_equal(frozen.centre, fitted.centre)  # codes stay valid
    assert not np.array_equal(frozen.weight, fitted.weight)
    assert torch.equal(trained(codes).detach(), torch.from_numpy(frozen.decode(codes)))


# -------------------------------------------------------------------------------------------- saliency

def test_salient_tokens_are_exactly_the_top_fraction():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.5, 0.6, 0.4])
    assert salient_tokens(scores, 0.2).tolist() == [1, 3]
    assert salient_tokens(scores, 0.25).tolist() == [1, 3, 5]  # ceil(2.5)
    assert salient_tokens(scores, 0.0).tolist() == [1] and len(salient_tokens(scores, 1.0)) == 10
    assert salient_tokens(torch.tensor([1.0, 1.0, 0.0]), 0.3).tolist() == [0]  # ties: the earlier token


def test_attention_from_matches_eager_attention(tiny_lm, tiny_model_dir):
    from transformers import LlamaForCausalLM

    eager = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    ids = torch.tensor([tiny_lm.tokenizer("The tower is in Paris. Where is it?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = eager(input_ids=ids, output_attentions=True).attentions
        h = embed(tiny_lm, ids)
        pos = positions(0, ids.shape[1], tiny_lm.device)
        for layer in range(tiny_lm.n_layers):
            rows = slice(ids.shape[1] - 3, ids.shape[1])
            assert torch.allclose(attention_from(tiny_lm, h, layer, pos, rows), reference[layer][0, :, rows], atol=1e-5)
            h = run_layers(tiny_lm, h, layer, layer + 1, pos, "causal")


@pytest.mark.parametrize("query_aware", [False, True])
def test_salient_loss_matches_the_top_fraction_by_the_teachers_attention(tiny_lm, monkeypatch, query_aware):
    import ragdemo.methods.btr.training as btr_module  # where the objectives and the fine-tune use it

    prefix, passages, lead, question = btr_parts(tiny_lm)
    lead = lead if query_aware else []
    split, n = 2, sum(map(len, passages))
    answer = tiny_lm.tokenizer(" in 1889", add_special_tokens=False)["input_ids"]
    query = question + answer
    # the teacher's attention from the question's tokens (not the answer's) to the passages, layers [split, L)
    full = torch.tensor([prefix + lead + passages[0] + passages[1] + query])
    start = len(prefix) + len(lead)
    with torch.no_grad():
        h, pos, expected = embed(tiny_lm, full), positions(0, full.shape[1], tiny_lm.device), 0
        for layer in range(tiny_lm.n_layers):
            if layer >= split:
                probs = attention_from(tiny_lm, h, layer, pos, slice(start + n, start + n + len(question)))
                expected = expected + probs[..., start:start + n].mean(dim=(0, 1)) / (tiny_lm.n_layers - split)
            h = run_layers(tiny_lm, h, layer, layer + 1, pos, "causal")
    top = set(torch.argsort(expected, descending=True)[:math.ceil(SALIENT_FRACTION * n)].tolist())
    picked = []
    real = btr_module.salient_tokens
    monkeypatch.setattr(btr_module, "salient_tokens", lambda s, f: picked.append(real(s, f)) or picked[-1])
    states = [embed(tiny_lm, torch.tensor([p]))[0].float() for p in passages]  # split 0 would be exact; any states do
    loss = salient_distill_loss(tiny_lm, nullcontext, prefix, passages, states, query, split, lead, len(question))
    assert set(picked[0].tolist()) == top and len(top) == math.ceil(0.2 * n)
    assert loss.item() > 0


def test_salient_state_term_is_zero_when_the_student_is_the_teacher(tiny_lm):
    prefix, passages, lead, question = btr_parts(tiny_lm)
    states = [embed(tiny_lm, torch.tensor([p]))[0].float() for p in passages]
    with torch.no_grad():
        loss = salient_distill_loss(tiny_lm, nullcontext, prefix, passages, states, question, 0, lead, len(question))
    assert abs(loss.item()) < 1e-5


# ------------------------------------------------------------------------------------------- the method

@pytest.fixture
def ingested(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    return tiny_bench


def test_objective_kl_keeps_todays_adapter_key_and_others_get_their_own(tiny_lm):
    method = get_method("btr")
    blob = b"decoder bytes"
    params = method.Params(split=2, query_aware=False)  # the plain layout's adapter key has no layout field
    assert params.objective == "kl"
    today = artifact_hash({"codes": method._chunk_hash(tiny_lm, params, blob), "k": params.k, "r": params.lora_r,
                           "steps": params.lora_steps, "lr": params.lora_lr, "recipe": RECIPE})
    assert method._adapter_hash(tiny_lm, params, blob) == today
    keys = {method._adapter_hash(tiny_lm, method.Params(split=2, objective=o), blob)
            for o in ("kl", "recovery", "salient", "recovery+salient")}
    assert len(keys) == 4
    assert method._chunk_hash(tiny_lm, method.Params(split=2, objective="recovery"), blob) == \
        method._chunk_hash(tiny_lm, params, blob)  # the codes do not depend on the trained decoder


def test_bad_objective_is_a_user_error(ingested):
    method = get_method("btr")
    with pytest.raises(UserError, match="objective"):
        method.answer("Where?", ingested.corpus(), method.Params(split=2, objective="mse"))
    with pytest.raises(UserError, match="calibrate"):
        method.finetune(ingested.corpus(), method.Params(split=2, objective="recovery", calibrate=False))


def test_recovery_trains_the_decoder_and_answers_read_it(ingested, monkeypatch):
    import ragdemo.methods.btr.training as btr_module  # where the objectives and the fine-tune use it

    corpus = ingested.corpus()
    lm = corpus.lm
    method = get_method("btr")
    knobs = dict(split=2, bits=1, k=2, lora_steps=12, lora_lr=1e-2, objective="recovery")
    params = method.Params(**knobs)
    trainings = []
    real = btr_module.train_adapter
    monkeypatch.setattr(btr_module, "train_adapter", lambda *a, **kw: trainings.append(real(*a, **kw)) or trainings[-1])
    seen = []
    method.finetune(corpus, params, lambda f, m: seen.append(m))
    losses = trainings[0].losses
    print(f"\nrecovery: {trainings[0].seconds / len(losses):.3f} s per step (tiny model, nice 19)")
    # each step is another random cloze example, so single losses are noisy; that the trainable decoder learns
    # is shown on a fixed target above, here that it trains without blowing up, with progress
    assert len(losses) == 12 and all(np.isfinite(losses)) and max(losses[-4:]) < 10 * max(losses[:4])
    assert any("LoRA step 12/12" in m for m in seen)

    sig = corpus.store.content_signature(corpus.collection_id)
    lsq, lsq_blob = method._load_decoder(corpus, params, sig)
    trained_blob = method._trained_decoder_blob(corpus, params, lsq_blob, sig)
    trained = Decoder.from_bytes(trained_blob)
    assert np.array_equal(trained.centre, lsq.centre) and not np.allclose(trained.weight, lsq.weight)
    account = method.storage(corpus, params)
    assert account.shared["trained decoder"] == len(trained_blob)
    assert account.chunk_bytes == method.storage(corpus, method.Params(split=2, bits=1, k=2)).chunk_bytes  # same codes

    question, gold = "When was the Eiffel Tower completed?", "in 1889"
    plan = method._plan(question, corpus, params)
    assert plan.adapter and any("objective=recovery" in n for n in plan.result.notes)
    hits = corpus.retrieve_in_order(question, params.k)[0]
    read = method._artifacts(corpus, params, hits)
    codes = [read.codes[chunk_key(h["text"])] for h in hits]
    assert all(torch.equal(s, torch.from_numpy(trained.decode(c))) for s, c in zip(plan.states, codes))

    prefix, lead, asked = method._query_side(plan.prompt)
    target = answer_ids(lm.tokenizer, gold)

    def manual_nll(decoder):
        states = [torch.from_numpy(decoder.decode(c)) for c in codes]
        with applied_adapter(lm, plan.adapter), torch.inference_mode():
            fwd = btr_forward(lm, prefix, states, asked + target, params.split, len(target) + 1, lead_ids=lead)
        return mean_nll(fwd.logits, target)

    answered = method.nll(question, gold, corpus, params)
    assert answered == pytest.approx(manual_nll(trained), abs=1e-6)
    assert abs(answered - manual_nll(lsq)) > 1e-6
    # without its adapter the trained decoder is not used: the plain least-squares decode
    plain = method._plan(question, corpus, method.Params(**{**knobs, "lora": False}))
    assert all(torch.equal(s, torch.from_numpy(lsq.decode(c))) for s, c in zip(plain.states, codes))
    result = method.answer(question, corpus, method.Params(**knobs, max_new_tokens=2))
    assert not result.error and result.storage_bytes >= len(trained_blob) + len(lsq_blob) + len(plan.adapter)


def test_salient_finetune_stores_its_own_adapter(ingested, monkeypatch):
    import ragdemo.methods.btr.training as btr_module  # where the objectives and the fine-tune use it

    corpus = ingested.corpus()
    method = get_method("btr")
    knobs = dict(split=2, bits=1, k=2, lora_steps=3, query_aware=True)
    real = btr_module.train_adapter
    for objective in ("kl", "salient", "recovery+salient"):  # the step times, side by side (printed with -s)
        trainings = []
        monkeypatch.setattr(btr_module, "train_adapter", lambda *a, **kw: trainings.append(real(*a, **kw)) or trainings[-1])
        method.finetune(corpus, method.Params(**knobs, objective=objective))
        print(f"\n{objective}: {trainings[0].seconds / 3:.3f} s per step (tiny model, nice 19)")
    assert method._plan("Where?", corpus, method.Params(**knobs, objective="recovery+salient")).adapter
    kl = method._plan("Where?", corpus, method.Params(**knobs)).adapter
    assert kl and kl != method._plan("Where?", corpus, method.Params(**knobs, objective="salient")).adapter


def test_bench_spec_with_an_objective_trains_and_answers(tiny_bench):
    from ragdemo.bench.datasets import Dataset, Haystack, Question
    from ragdemo.bench.runner import parse_method_specs, run_bench

    specs = parse_method_specs("btr@split=2@objective=recovery@train=1@lora_steps=2@k=2")
    assert specs[0].params(4).objective == "recovery" and specs[0].params(4).train
    docs = [("eiffel.txt", "The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair. " * 4),
            ("bananas.txt", "Bananas are yellow fruits rich in potassium. " * 8)]
    dataset = Dataset("tiny", [Haystack("t", docs, [Question("q1", "When was the tower completed?", ["1889"])])], "t")
    run = run_bench(tiny_bench, dataset, specs, reference="rag", max_new_tokens=2)
    result = run.records[0]["results"]["btr@split=2@objective=recovery@train=1@lora_steps=2@k=2"]
    assert result["answered"] and not result.get("error")
    assert any("objective=recovery" in n for n in result["notes"])  # trained at prepare, its decoder read
