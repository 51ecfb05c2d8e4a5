"""LLoCO-style compressed KV: exact at ratio 1, exact token budgets, clean adapters, CLI round trip."""
import json
import time

import pytest
import torch

from ragdemo.engine import kv as kvc
from ragdemo.engine.layers import forward_all
from ragdemo.engine.lora import applied_adapter
from ragdemo.engine.prompt import build_prompt
from ragdemo.errors import NotSupported
from ragdemo.methods import get_method
from ragdemo.methods.base import params_from
from ragdemo.models.packed import is_linear

QUESTION = "When was the tower completed?"


def _ingest(bench, docs_dir, collection="default"):
    bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], collection)
    return bench.corpus(collection)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_one_passage_at_ratio_1_gives_the_full_forward_logits(tiny_bench, docs_dir, positions):
    corpus = _ingest(tiny_bench, docs_dir)
    lloco = get_method("lloco")
    params = params_from(lloco.Params, {"c": 1, "k": 1, "positions": positions, "storage": "fp16"})
    lloco.prepare(corpus, params)
    ctx = lloco._context(QUESTION, corpus, params)
    with torch.inference_mode():
        got = forward_all(corpus.lm, torch.tensor([ctx.question_ids]), ctx.cache, ctx.next_pos)
        hit = corpus.retrieve(QUESTION, 1)[0]
        full_ids = build_prompt(corpus.lm.tokenizer, QUESTION, hit).ids
        want = corpus.lm.model(input_ids=torch.tensor([full_ids])).logits[:, -len(ctx.question_ids):]
    from ragdemo.engine.prefix import instruction_ids

    assert len(instruction_ids(corpus.lm)) + sum(ctx.kept_per_passage) + len(ctx.question_ids) == len(full_ids)
    # stored keys are position-free, so even here every key went through un-rotation and re-rotation;
    # the only loss is fp16 storage
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    assert int(got[0, -1].argmax()) == int(want[0, -1].argmax())


@pytest.mark.parametrize("scorer", kvc.SCORERS)
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_compression_keeps_exactly_one_in_c_per_layer_and_head(tiny_lm, scorer, ratio):
    prefix = kvc.prefix_layers(tiny_lm, tiny_lm.tokenizer("Context:\n", add_special_tokens=False)["input_ids"])
    ids = tiny_lm.tokenizer("The Eiffel Tower is a wrought-iron lattice tower in Paris, France, built in 1889.",
                            add_special_tokens=False)["input_ids"]
    cue = tiny_lm.tokenizer(kvc.RECONSTRUCT_CUE, add_special_tokens=False)["input_ids"]
    full, recon = kvc.capture(tiny_lm, prefix, ids, cue if scorer == "reconstruct" else None)
    scores = recon if scorer == "reconstruct" else kvc.keynorm_scores(full)
    assert scores.shape == full.offsets.shape == (tiny_lm.n_layers, 2, len(ids))
    small = kvc.compress(full, scores, ratio)
    want = -(-len(ids) // ratio)
    assert small.keys.shape == small.values.shape == (tiny_lm.n_layers, 2, want, full.keys.shape[-1])
    for layer in range(tiny_lm.n_layers):
        for head in range(2):
            kept = small.offsets[layer, head]
            assert kept.tolist() == sorted(set(kept.tolist()))  # distinct, in passage order
            threshold = scores[layer, head].sort(descending=True).values[want - 1]
            assert bool((scores[layer, head][kept] >= threshold).all())  # the best-scored ones
    restored = kvc.from_bytes(kvc.to_bytes(small, "fp16"), torch.float32, "cpu")
    assert restored.n_tokens == len(ids) and torch.equal(restored.offsets, small.offsets)
    torch.testing.assert_close(restored.keys, small.keys, atol=1e-2, rtol=1e-3)


def test_int8_storage_is_about_half_and_close(tiny_lm):
    prefix = kvc.prefix_layers(tiny_lm, [1, 2, 3])
    full, _ = kvc.capture(tiny_lm, prefix, list(range(100, 164)))
    fp16, int8 = kvc.to_bytes(full, "fp16"), kvc.to_bytes(full, "int8")
    assert len(int8) < 0.6 * len(fp16)
    back = kvc.from_bytes(int8, torch.float32, "cpu")
    err = (back.keys - full.keys).abs().max() / full.keys.abs().max()
    assert 0 < err < 0.01


@pytest.mark.parametrize("storage,ratio,error", [("int8", 0.53, 0.01), ("k8v4", 0.40, 0.15), ("int4", 0.28, 0.15)])
def test_quantised_storage_sizes_and_errors(storage, ratio, error):
    """Each stored dtype against fp16: its size and its worst error relative to each vector's largest entry (a
    4-bit grid has 7 steps each side); keys and values quantised as `QUANTISATION` says."""
    torch.manual_seed(0)
    keys, values = torch.randn(4, 3, 40, 64), torch.randn(4, 3, 40, 64)
    kv = kvc.PassageKV(keys, values, torch.arange(40).expand(4, 3, 40).clone(), 40)
    blob = kvc.to_bytes(kv, storage)
    assert len(blob) < ratio * len(kvc.to_bytes(kv, "fp16"))
    back = kvc.from_bytes(blob, torch.float32, "cpu")
    for name, got, want in (("keys", back.keys, keys), ("values", back.values, values)):
        bits, _ = kvc.QUANTISATION[storage][name]
        worst = ((got - want).abs() / want.abs().amax(dim=-1, keepdim=True)).max()
        assert 0 < worst <= 0.5 / (2 ** (bits - 1) - 1) + 1e-3 and worst < error, (name, worst)


def test_offsets_are_left_out_of_full_caches_and_one_byte_when_compressed():
    keys = torch.randn(2, 3, 10, 8)
    full = kvc.PassageKV(keys, keys.clone(), torch.arange(10).expand(2, 3, 10).clone(), 10)
    kept = kvc.compress(full, torch.rand(2, 3, 10), 2)
    assert b'"offsets"' not in kvc.to_bytes(full)[:300] and b'"U8"' in kvc.to_bytes(kept)[:300]
    for kv in (full, kept):
        back = kvc.from_bytes(kvc.to_bytes(kv), torch.float32, "cpu")
        assert torch.equal(back.offsets, kv.offsets) and back.n_tokens == 10


def test_changed_knob_never_reuses_artifacts_and_delete_cascades(tiny_bench, docs_dir):
    corpus = _ingest(tiny_bench, docs_dir)
    lloco = get_method("lloco")
    c2, c4 = params_from(lloco.Params, {"c": 2, "storage": "fp16"}), params_from(lloco.Params, {"c": 4, "storage": "int8"})
    lloco.prepare(corpus, c2)
    assert lloco.storage(corpus, c2).total > 0 and lloco.storage(corpus, c4).total == 0
    lloco.prepare(corpus, c4)
    assert 0 < lloco.storage(corpus, c4).total < lloco.storage(corpus, c2).total / 2
    tiny_bench.delete("eiffel.txt")
    tiny_bench.delete("bananas.md")
    assert lloco.storage(corpus, c2).total == 0 and lloco.storage(corpus, c4).total == 0


def _layer0_widths(lm):
    """Counts the tokens that really pass through layer 0, call by call (not a counter the method sets)."""
    widths = []

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        widths.append(int(hidden.shape[1]))

    return widths, lm.model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)


def test_answer_prefills_only_the_question(tiny_bench, docs_dir):
    corpus = _ingest(tiny_bench, docs_dir)
    knobs = {"lloco": {"c": 4, "max_new_tokens": 4}}
    tiny_bench.prepare(["lloco"], knobs=knobs)
    tiny_bench.ask(QUESTION, ["lloco"], knobs=knobs)  # the instruction prefix is in the LM's prefix cache now
    widths, handle = _layer0_widths(corpus.lm)
    try:
        lloco, = tiny_bench.ask(QUESTION, ["lloco"], knobs=knobs)
    finally:
        handle.remove()
    question_tokens = lloco.segments[-1]["n_tokens"]
    assert not lloco.error and widths, "layer 0 never ran"
    assert widths[0] == question_tokens  # the prefill: the question and nothing else
    assert all(w == 1 for w in widths[1:]) and len(widths) <= 4  # then one token per decode step
    assert lloco.processed_tokens == question_tokens
    passages = [s for s in lloco.segments if s["kind"] == "passage"]
    assert passages and all(s["mark"] == "compressed" for s in passages)
    assert all(s["kept_tokens"] == -(-s["n_tokens"] // 4) for s in passages)
    assert lloco.cached_tokens == lloco.segments[0]["n_tokens"] + sum(s["kept_tokens"] for s in passages)
    assert lloco.prompt_tokens == lloco.cached_tokens + question_tokens
    assert lloco.storage_bytes > 0 and lloco.bytes_per_token > 0 and lloco.chunk_bytes_per_token > 0
    assert lloco.load_s > 0 and lloco.prepare_s == 0
    assert {s["chunk_id"] for s in lloco.sources} <= {c["chunk_id"] for c in corpus.chunks()}


def test_what_the_model_sees_marks_each_passage_token_kept_or_dropped(tiny_bench, docs_dir):
    corpus = _ingest(tiny_bench, docs_dir)
    lloco = get_method("lloco")
    result = lloco.answer(QUESTION, corpus, params_from(lloco.Params, {"c": 4, "k": 3, "max_new_tokens": 2}))
    passages = [s for s in result.segments if s["kind"] == "passage"]
    assert passages
    for seg in passages:
        keep = seg["keep"]
        assert len(keep) == len(seg["tokens"]) == seg["n_tokens"]
        assert all(0.0 <= k <= 1.0 for k in keep) and min(keep) < max(keep)
        mean = sum(keep) / len(keep)  # every layer and KV head keeps ceil(n / 4) tokens
        assert mean == pytest.approx(seg["kept_tokens"] / seg["n_tokens"], abs=2e-3)
        assert 0.25 - 2e-3 <= mean <= 0.25 + 1 / seg["n_tokens"] + 2e-3
    assert "keep" not in result.segments[-1]  # the question is read whole


def test_compressing_missing_chunks_is_prepare_s_never_ttft_or_processed(tiny_bench, docs_dir, monkeypatch):
    """An answer on an unprepared collection compresses the retrieved chunks first: that is preparation (slowed
    here by 4 s so it is plain to see), reported as prepare_s, never in load, TTFT, total or processed."""
    corpus = _ingest(tiny_bench, docs_dir)
    tiny_bench.warm()
    lloco = get_method("lloco")
    real = lloco.pass_job

    def slow(*args, **kwargs):
        time.sleep(4.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(lloco, "pass_job", slow)
    params = params_from(lloco.Params, {"c": 4, "k": 2, "max_new_tokens": 3})
    called = time.perf_counter()
    first = lloco.answer(QUESTION, corpus, params)
    wall = time.perf_counter() - called
    assert first.prepare_s >= 4.0 and any("prepare_s" in n for n in first.notes)
    # the answer's clock skips the preparation: what it reports plus prepare_s fits in the wall time
    assert first.total_s + first.prepare_s <= wall + 1e-3 and first.load_s <= first.ttft_s <= first.total_s
    kept = sum(-(-s["n_tokens"] // 4) for s in first.segments if s["kind"] == "passage")
    question = first.segments[-1]["n_tokens"]
    assert first.prompt_tokens == first.segments[0]["n_tokens"] + kept + question
    assert first.processed_tokens <= first.prompt_tokens  # compressing passages is not query-time processing
    second = lloco.answer(QUESTION, corpus, params)
    assert second.prepare_s == 0 and second.prompt_tokens == first.prompt_tokens


def test_the_prefix_counts_as_cached_only_when_read_from_the_prefix_cache(tiny_bench, docs_dir):
    corpus = _ingest(tiny_bench, docs_dir)
    lloco = get_method("lloco")
    params = params_from(lloco.Params, {"c": 4, "k": 2, "max_new_tokens": 2})
    lloco.prepare(corpus, params)
    corpus.lm.prefix_cache = None  # a cold LM: the prefix is computed during the answer
    cold = lloco.answer(QUESTION, corpus, params)
    warm = lloco.answer(QUESTION, corpus, params)
    prefix, question = cold.segments[0]["n_tokens"], cold.segments[-1]["n_tokens"]
    assert cold.segments[0]["mark"] == "text" and warm.segments[0]["mark"] == "cached"
    assert cold.processed_tokens == prefix + question and warm.processed_tokens == question
    assert warm.cached_tokens == cold.cached_tokens + prefix
    assert cold.prompt_tokens == warm.prompt_tokens


def test_lora_trains_applies_and_unloads_cleanly(tiny_bench, docs_dir):
    corpus = _ingest(tiny_bench, docs_dir)
    lm = corpus.lm
    ids = torch.tensor([lm.tokenizer("The tower was completed in 1889.")["input_ids"]])
    with torch.inference_mode():
        before = lm.model(input_ids=ids).logits
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    seen = []
    summary = tiny_bench.finetune("lloco", knobs={"lloco": {"lora_steps": 6, "lora_lr": 1e-2}},
                                  progress=lambda f, m: seen.append(f))
    assert "6 steps" in summary and seen[-1] == pytest.approx(1.0)
    # training left nothing behind: plain (or packed) Linear layers, no LoRA layer, same weights, same requires_grad flags
    assert all(is_linear(l.self_attn.q_proj) for l in lm.model.model.layers)
    assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == grads
    lloco = get_method("lloco")
    params = params_from(lloco.Params, {"lora_steps": 6, "lora_lr": 1e-2})
    blob = lloco._context(QUESTION, corpus, params).adapter
    assert blob, "the adapter is stored with the collection and found at answer time"
    with applied_adapter(lm, blob), torch.inference_mode():
        adapted = lm.model(input_ids=ids).logits
    with torch.inference_mode():
        after = lm.model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)
    assert torch.equal(after, before)  # unloaded bit for bit: other methods see the base model
    with_lora, = tiny_bench.ask(QUESTION, ["lloco"], knobs={"lloco": {"lora_steps": 6, "lora_lr": 1e-2}})
    without, = tiny_bench.ask(QUESTION, ["lloco"], knobs={"lloco": {"lora": False}})
    assert any("LoRA applied" in n for n in with_lora.notes) and not any("LoRA" in n for n in without.notes)
    assert lloco.storage(corpus, params).total > 0
    tiny_bench.store.delete_document(corpus.collection_id, "eiffel.txt")
    tiny_bench.store.delete_document(corpus.collection_id, "bananas.md")


def test_non_llama_models_get_a_clear_not_supported(tiny_bench, docs_dir, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = _ingest(tiny_bench, docs_dir)
    lm = corpus.lm  # shared by every later test: monkeypatch puts the Llama back afterwards
    monkeypatch.setattr(lm, "model", GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(lm.tokenizer))))
    lloco = get_method("lloco")
    with pytest.raises(NotSupported, match="Llama-family"):
        lloco.prepare(corpus, lloco.Params())
    result, = tiny_bench.ask(QUESTION, ["lloco"])
    assert "Llama-family" in result.error


def test_cli_prepare_then_ask_rag_and_lloco_json(tmp_path, tiny_model_dir, docs_dir):
    from tests.test_cli import run

    home = tmp_path / "home"
    run(["ingest", *map(str, sorted(docs_dir.iterdir())), "--collection", "demo"], home, tiny_model_dir)
    prepared = run(["prepare", "--methods", "lloco", "--collection", "demo", "--set", "lloco.c=2"], home, tiny_model_dir)
    assert "lloco: prepared" in prepared.stdout
    asked = run(["ask", QUESTION, "--collection", "demo", "--methods", "rag,lloco", "--set", "lloco.c=2", "--json"],
                home, tiny_model_dir)
    rag, lloco = json.loads(asked.stdout)
    assert (rag["method"], lloco["method"]) == ("rag", "lloco") and not lloco["error"]
    assert lloco["cached_tokens"] > 0 and lloco["processed_tokens"] < rag["processed_tokens"]
    assert not any("not prepared" in n for n in lloco["notes"])


def test_prepare_with_train_compresses_then_trains_the_adapter_once(tiny_bench, docs_dir):
    corpus = _ingest(tiny_bench, docs_dir)
    lloco = get_method("lloco")
    params = params_from(lloco.Params, {"train": True, "lora_steps": 3})
    lloco.prepare(corpus, params)
    assert lloco._has_adapter(corpus, corpus.lm, params)
    assert lloco._context(QUESTION, corpus, params).adapter


def test_distilled_lora_moves_compressed_reading_towards_the_full_text(tiny_bench, docs_dir):
    """The adapter is trained to make the model reading compressed caches agree with the model reading the text."""
    import random
    from contextlib import nullcontext

    from ragdemo.engine.lora import cloze_example, distill_kl, teacher_logits
    from ragdemo.engine.prompt import encode, passage_text

    corpus = _ingest(tiny_bench, docs_dir)
    lm, lloco = corpus.lm, get_method("lloco")
    knobs = {"c": 4, "k": 2, "lora_steps": 30, "lora_lr": 1e-2, "storage": "fp16"}  # the recipe as tuned
    params = params_from(lloco.Params, knobs)
    lloco.prepare(corpus, params)
    picked, question, target = cloze_example(lm.tokenizer, corpus.chunks(), 2, random.Random(1))
    query = question + target
    prefix_ids, prefix = lloco._prefix(lm)
    teacher = teacher_logits(lm, nullcontext, prefix_ids, [encode(lm.tokenizer, passage_text(c["text"])) for c in picked], query)

    def kl(adapter):
        passages, _, _ = lloco._load_passages(corpus, lm, params, lloco._artifact_hash(lm, params), picked)
        layers, next_pos = lloco._place(lm, prefix, passages, params)
        with applied_adapter(lm, adapter), torch.inference_mode():
            return distill_kl(forward_all(lm, torch.tensor([query]), kvc.cache_from(layers), next_pos)[0], teacher).item()

    before = kl(None)
    tiny_bench.finetune("lloco", knobs={"lloco": knobs})
    assert kl(lloco._context(QUESTION, corpus, params).adapter) < 0.8 * before
