import time

import numpy as np
import pytest
import torch

from ragdemo.engine import binary
from ragdemo.engine.calibration import fit_decoder
from ragdemo.engine.merging import bipartite_merge, merge_by_token
from ragdemo.engine.scoring import nll_of_answer
from ragdemo.errors import NotSupported
from ragdemo.methods import get_method
from ragdemo.engine.prefix import instruction_ids
from ragdemo.methods.btr import btr_forward, lower_states


# ------------------------------------------------------------------------------------------------ bits

@pytest.mark.parametrize("d", [64, 576, 13])
def test_sign_packing_round_trips(d):
    x = np.random.default_rng(0).normal(size=(7, d)).astype(np.float32)
    packed = binary.pack_signs(x)
    assert packed.dtype == np.uint8 and packed.shape == (7, (d + 7) // 8)
    assert np.array_equal(binary.unpack_signs(packed, d), np.where(x >= 0, 1.0, -1.0))


def test_blob_round_trips_and_more_bits_lower_error():
    x = np.random.default_rng(1).normal(size=(20, 64)).astype(np.float32) * 3 + 1
    errors = []
    for bits in (1, 2, 4, 8):
        codes = binary.encode(x, bits)
        back = binary.from_blob(binary.to_blob(codes))
        assert np.array_equal(back.planes, codes.planes) and np.array_equal(back.scales, codes.scales)
        assert len(binary.to_blob(codes)) == 16 + bits * 20 * 8 + 20 * 2
        errors.append(float(np.mean((back.reconstruct() - x) ** 2)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]
    fp16 = binary.from_blob(binary.to_blob(binary.encode(x, 16)))
    assert np.allclose(fp16.reconstruct(), x, atol=1e-2)


def test_calibrated_decoder_beats_plain_signs_on_offset_channels():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x[:, :4] += 20.0  # "massive" channels that are always positive: raw signs say nothing about them
    plain = binary.encode(x, 1).reconstruct()
    decoder = fit_decoder([x], 1)
    calibrated = decoder.decode(binary.encode(x, 1, decoder.centre))
    assert np.mean((calibrated - x) ** 2) < 0.5 * np.mean((plain - x) ** 2)
    again = type(decoder).from_bytes(decoder.to_bytes())  # stored in fp16: half the bytes, rounding only
    assert len(decoder.to_bytes()) < 0.55 * (decoder.weight.nbytes + decoder.centre.nbytes)
    assert np.allclose(again.weight, decoder.weight, rtol=1e-3, atol=1e-3 * np.abs(decoder.weight).max())
    assert np.allclose(again.centre, decoder.centre, rtol=1e-3, atol=1e-3)
    assert again.weight.dtype == np.float32  # decoded in fp32


def test_hamming_distances():
    a = binary.pack_signs(np.array([[1, 1, -1, -1, 1, 1, 1, 1, 1]], np.float32))
    b = binary.pack_signs(np.array([[1, -1, -1, 1, 1, 1, 1, 1, -1], [1, 1, -1, -1, 1, 1, 1, 1, 1]], np.float32))
    assert binary.hamming(a, b).tolist() == [[3, 0]]


# --------------------------------------------------------------------------------------------- merging

def test_zero_ratio_merging_is_identity():
    h, pos = torch.randn(1, 10, 8), torch.arange(10)[None]
    merged = bipartite_merge(h, pos, torch.arange(2, 8), 0.0)
    assert merged.removed == 0 and torch.equal(merged.hidden, h) and torch.equal(merged.pos, pos)


def test_merging_folds_forward_into_most_similar_token():
    h = torch.randn(1, 8, 16)
    h[0, 3] = h[0, 2] * 2  # token 2 (set A) is a scaled copy-partner of token 3 (set B)
    merged = bipartite_merge(h, torch.arange(8)[None], torch.arange(2, 8), 0.2)
    assert merged.removed == 1 and merged.pos.tolist() == [[0, 1, 3, 4, 5, 6, 7]]
    assert torch.allclose(merged.hidden[0, 2], (h[0, 2] + h[0, 3]) / 2)
    assert torch.equal(merged.hidden[0, 0], h[0, 0]) and torch.equal(merged.hidden[0, -1], h[0, -1])


def test_offline_merge_collapses_stopwords_and_pairs_the_rest():
    rng = np.random.default_rng(3)
    codes = binary.pack_signs(rng.normal(size=(10, 16)))
    scales = np.ones(10, np.float16)
    tokens = np.array([5, 5, 5, 5, 7, 7, 7, 7, 9, 11])  # 5 is a stopword
    book = merge_by_token(tokens, codes, scales, 0.5, {5}, 16)
    assert len(book.codes) == 1 + 2 + 1 + 1  # stopword -> 1, token 7 -> 2 (half folded), 9 and 11 alone
    assert len(set(book.index[:4].tolist())) == 1
    assert np.array_equal(book.codes[book.index[8]], codes[8])
    untouched = merge_by_token(tokens, codes, scales, 0.0, set(), 16)
    assert len(untouched.codes) == 10 and np.array_equal(untouched.codes[untouched.index], codes)


# --------------------------------------------------------------------------------------------- model

def _prompt_parts(lm):
    tok = lm.tokenizer
    prefix = instruction_ids(lm)
    passages = [tok("The Eiffel Tower was completed in 1889.\n\n", add_special_tokens=False)["input_ids"],
                tok("Bananas are yellow.\n\n", add_special_tokens=False)["input_ids"]]
    question = tok("Question: When was it completed?\nAnswer:", add_special_tokens=False)["input_ids"]
    return prefix, passages, question


def test_split_layers_counts_passages_as_upper_layers_only(tiny_lm):
    prefix, passages, question = _prompt_parts(tiny_lm)
    states = [lower_states(tiny_lm, prefix, p, 2) for p in passages]
    with torch.inference_mode():
        fwd = btr_forward(tiny_lm, prefix, states, question, split=2)
        merged = btr_forward(tiny_lm, prefix, states, question, split=2, r_p=0.5, merge_layer=3)
    n, L = sum(map(len, passages)), tiny_lm.n_layers
    assert fwd.token_layers == (len(prefix) + len(question)) * L + n * (L - 2)
    assert merged.removed > 0
    assert merged.token_layers == (len(prefix) + len(question)) * L + n * 1 + (n - merged.removed) * 1
    assert [layer.keys.shape[-2] for layer in fwd.cache.layers] == [len(prefix) + len(question)] * 2 + [fwd.next_pos] * 2


def test_passage_states_after_the_prefix_match_the_full_model(tiny_lm):
    """A passage right after the prefix sees, in layers [0, split), exactly what the full model shows it."""
    prefix, passages, _ = _prompt_parts(tiny_lm)
    ids = prefix + passages[0]
    with torch.inference_mode():
        hidden = tiny_lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2]
    assert torch.allclose(lower_states(tiny_lm, prefix, passages[0], 2), hidden[0, len(prefix):].float(), atol=1e-4)


@pytest.fixture
def ingested(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    return tiny_bench


def test_ask_btr_on_tiny_model(ingested):
    ingested.prepare(["btr"], knobs={"btr": {"split": 2, "bits": 1, "k": 2}})
    rag, btr = ingested.ask("When was the Eiffel Tower completed?", ["rag", "btr"],
                            knobs={"rag": {"k": 2}, "btr": {"split": 2, "bits": 1, "k": 2}})
    assert not btr.error and btr.new_tokens > 0 and btr.ttft_s > 0
    assert [s["chunk_id"] for s in btr.sources] and {s["mark"] for s in btr.segments if s["kind"] == "passage"} == {"binarized"}
    passage_tokens = sum(s["n_tokens"] for s in btr.segments if s["kind"] == "passage")
    other = btr.prompt_tokens - passage_tokens
    L = 4
    prefix = btr.segments[0]["n_tokens"]  # rag's answer just cached the shared instruction prefix
    # a passage token's lower 2 of 4 layers were read from its stored states, its upper 2 computed now
    assert btr.cached_tokens == pytest.approx(passage_tokens * 2 / L + prefix, abs=0.01)
    assert btr.segments[0]["mark"] == "cached"
    assert btr.processed_tokens == pytest.approx(other - prefix + passage_tokens * (L - 2) / L, abs=0.01)
    assert btr.prompt_tokens == pytest.approx(btr.processed_tokens + btr.cached_tokens, abs=0.01)
    # per chunk: 1 bit x 64 dims = 8 bytes per token, plus 2 bytes of scale and the blob header amortised
    assert 10 <= btr.chunk_bytes_per_token < 11
    assert btr.storage_bytes > btr.chunk_bytes_per_token * passage_tokens  # chunk blobs + the shared decoder
    # the headline figure is amortised over the collection with every byte counted, decoder included
    account = get_method("btr").storage(ingested.corpus(), get_method("btr").Params(split=2, bits=1, k=2))
    assert btr.bytes_per_token == pytest.approx(account.bytes_per_token, rel=1e-3) and account.shared["decoder"] > 0
    assert any(f"{23040 // 360}" in n or "everything counted" in n for n in btr.notes)
    assert not any("prepared the collection first" in n for n in btr.notes)


def test_artifacts_are_keyed_by_split_bits_and_model(ingested, monkeypatch):
    corpus = ingested.corpus()
    method = get_method("btr")
    base = method.Params(split=2, bits=1)
    method.prepare(corpus, base)
    stored = method.storage(corpus, base).total
    assert stored > 0
    for changed in (method.Params(split=1, bits=1), method.Params(split=2, bits=2),
                    method.Params(split=2, bits=1, calibrate=False)):
        assert method.storage(corpus, changed).total == 0  # nothing reused
        method.prepare(corpus, changed)
        assert method.storage(corpus, changed).total > 0
    assert method.storage(corpus, method.Params(split=2, bits=2)).total > stored
    monkeypatch.setattr(corpus.lm, "model_id", corpus.lm.model_id + "-other")  # another model: a fresh key space
    assert method.storage(corpus, base).total == 0
    result = method.answer("Where is the tower?", corpus, method.Params(split=2, bits=1, max_new_tokens=2))
    assert any("prepared the collection first" in n for n in result.notes)


def test_the_decoder_is_parsed_once_per_stored_version(ingested, monkeypatch, docs_dir):
    from ragdemo.engine import calibration

    parsed = []
    real = calibration.Decoder.from_bytes.__func__
    monkeypatch.setattr(calibration.Decoder, "from_bytes",
                        classmethod(lambda cls, blob: parsed.append(len(blob)) or real(cls, blob)))
    corpus, method = ingested.corpus(), get_method("btr")
    params = method.Params(split=2, bits=1, k=2, max_new_tokens=2)
    method.prepare(corpus, params)
    first = method.answer("Where is the tower?", corpus, params)
    count = len(parsed)
    second = method.answer("Where is the tower?", corpus, params)
    assert len(parsed) == count and second.answer == first.answer  # the second answer parsed nothing
    (docs_dir / "more.txt").write_text("The tower is repainted every seven years. " * 6)
    ingested.ingest([("more.txt", docs_dir / "more.txt")])  # new content: a new decoder is fitted and read
    method.prepare(corpus, params)
    method.answer("Where is the tower?", corpus, params)
    assert len(parsed) > count


def test_nll_at_split_zero_float_equals_plain_prompt(ingested):
    corpus = ingested.corpus()
    method = get_method("btr")
    params = method.Params(split=0, bits=16, calibrate=False, k=2)
    prompt = method._plan("When was the tower completed?", corpus, params).prompt
    expected = nll_of_answer(corpus.lm, prompt.ids, "in 1889")
    assert method.nll("When was the tower completed?", "in 1889", corpus, params) == pytest.approx(expected, abs=2e-3)


def test_non_llama_models_are_not_supported(tiny_lm):
    import dataclasses

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = dataclasses.replace(tiny_lm, model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)))
    with pytest.raises(NotSupported):
        get_method("btr")._check(gpt2, get_method("btr").Params())


def test_offline_merging_shrinks_storage_and_still_answers(ingested):
    corpus = ingested.corpus()
    method = get_method("btr")
    plain, merged = method.Params(split=2, bits=1), method.Params(split=2, bits=1, r_o=0.5, max_new_tokens=3)
    method.prepare(corpus, merged)
    codes = method.storage(corpus, plain)
    merged_account = method.storage(corpus, merged)
    assert 0 < merged_account.chunk_bytes < codes.chunk_bytes and merged_account.shared["codebook"] > 0
    assert merged_account.shared["decoder"] == codes.shared["decoder"]
    result = method.answer("When was the Eiffel Tower completed?", corpus, merged)
    assert not result.error and result.new_tokens > 0
    assert not any("prepared the collection first" in n for n in result.notes)
    assert result.chunk_bytes_per_token == pytest.approx(4.0)  # a uint32 code index per token, vs 8 B + 2 B unmerged
    assert result.bytes_per_token == pytest.approx(merged_account.bytes_per_token, rel=1e-3)
    with pytest.raises(Exception, match="bits=1"):
        method.answer("x?", corpus, method.Params(split=2, bits=2, r_o=0.5))


# ------------------------------------------------------------------------------------ distilled LoRA

def _kl_to_full_model(corpus, method, params, adapter, rng_seed=1):
    """KL(full model on the text || BTR on decoded bits [+ adapter]) on one fixed cloze example."""
    import random
    from contextlib import nullcontext

    from ragdemo.engine.lora import applied_adapter, cloze_example, distill_kl, teacher_logits
    from ragdemo.engine.prompt import passage_ids

    lm = corpus.lm
    picked, question, target = cloze_example(lm.tokenizer, corpus.chunks(), params.k, random.Random(rng_seed))
    query = question + target
    states = method._load(corpus, params, picked)[0]
    prefix = instruction_ids(lm)
    teacher = teacher_logits(lm, nullcontext, prefix, [passage_ids(lm.tokenizer, c["text"]) for c in picked], query)
    with applied_adapter(lm, adapter), torch.inference_mode():
        student = btr_forward(lm, prefix, states, query, params.split, len(query)).logits[0]
    return distill_kl(student, teacher).item()


def test_distilled_lora_moves_btr_towards_the_full_model_and_unloads(ingested):
    corpus = ingested.corpus()
    lm = corpus.lm
    method = get_method("btr")
    knobs = {"split": 2, "bits": 1, "k": 2, "lora_steps": 30, "lora_lr": 1e-2}
    params = method.Params(**knobs)
    method.prepare(corpus, params)
    before_kl = _kl_to_full_model(corpus, method, params, None)
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    seen = []
    summary = ingested.finetune("btr", knobs={"btr": knobs}, progress=lambda f, m: seen.append(f))
    assert "30 steps" in summary and seen[-1] == pytest.approx(1.0)
    assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())  # nothing left in the base model
    adapter = method._plan("Where is the tower?", corpus, params).adapter
    from safetensors.torch import load as load_tensors
    layers = {int(key.split(".layers.")[1].split(".")[0]) for key in load_tensors(adapter.read())}
    assert layers == {2, 3}  # only the upper layers [split, L) are adapted
    after_kl = _kl_to_full_model(corpus, method, params, adapter)
    assert after_kl < 0.8 * before_kl
    with_lora, = ingested.ask("Where is the tower?", ["btr"], knobs={"btr": {**knobs, "max_new_tokens": 3}})
    without, = ingested.ask("Where is the tower?", ["btr"], knobs={"btr": {**knobs, "lora": False, "max_new_tokens": 3}})
    assert any("distilled LoRA" in n for n in with_lora.notes) and not any("LoRA" in n for n in without.notes)
    assert with_lora.storage_bytes == without.storage_bytes + len(adapter)
    assert method._plan("Where is the tower?", corpus, method.Params(**{**knobs, "bits": 2})).adapter is None  # per bits


def test_prepare_with_train_distils_once(ingested):
    corpus = ingested.corpus()
    method = get_method("btr")
    params = method.Params(split=3, bits=2, k=2, train=True, lora_steps=2)
    method.prepare(corpus, params)
    assert method._plan("Where is the tower?", corpus, params).adapter
    with pytest.raises(Exception, match="no upper layers"):
        method.finetune(corpus, method.Params(split=4, k=2))


# ------------------------------------------------------------------------------- honest fields

def test_preparation_inside_an_answer_is_prepare_s_not_ttft(ingested, monkeypatch):
    """Artifacts missing at answer time are built then, and that time is reported apart: TTFT, load and total
    start after it. Preparation is slowed by 2 s so that it is plain to see."""
    corpus = ingested.corpus()
    ingested.warm()
    method = get_method("btr")
    real_prepare = method.prepare

    def slow_prepare(*args, **kwargs):
        real_prepare(*args, **kwargs)
        time.sleep(2.0)

    monkeypatch.setattr(method, "prepare", slow_prepare)
    params = method.Params(split=2, bits=1, k=2, max_new_tokens=3)
    called = time.perf_counter()
    first = method.answer("Where is the tower?", corpus, params)
    wall = time.perf_counter() - called
    assert first.prepare_s >= 2.0 and any("prepared the collection first" in n for n in first.notes)
    # the answer's clock skips the preparation: what it reports plus prepare_s fits in the wall time
    assert first.total_s + first.prepare_s <= wall + 1e-3 and first.load_s <= first.ttft_s <= first.total_s
    second = method.answer("Where is the tower?", corpus, params)
    assert second.prepare_s == 0 and not any("prepared the collection first" in n for n in second.notes)


def test_load_s_includes_switching_the_adapter(ingested, monkeypatch):
    from contextlib import contextmanager

    import ragdemo.methods.btr.method as btr_module  # where the answer switches its adapter

    corpus = ingested.corpus()
    method = get_method("btr")
    params = method.Params(split=2, bits=1, k=2, lora_steps=2, max_new_tokens=2)
    method.finetune(corpus, params)
    real = btr_module.applied_adapter

    @contextmanager
    def slow_switch(lm, blob):
        time.sleep(0.3 if blob else 0.0)  # a slow adapter switch: it must show in load_s, as LLoCO's does
        with real(lm, blob):
            yield

    monkeypatch.setattr(btr_module, "applied_adapter", slow_switch)
    result = method.answer("Where is the tower?", corpus, params)
    assert any("distilled LoRA" in n for n in result.notes) and result.load_s >= 0.3


def test_prompt_tokens_after_runtime_merging_and_processed_never_more(ingested):
    corpus = ingested.corpus()
    method = get_method("btr")
    plain = method.answer("Where is the tower?", corpus, method.Params(split=2, bits=1, k=3, max_new_tokens=2))
    merged = method.answer("Where is the tower?", corpus, method.Params(split=2, bits=1, k=3, r_p=0.5, max_new_tokens=2))
    folded = int(next(n for n in merged.notes if n.startswith("runtime merging folded")).split()[3])
    L, split = 4, 2
    # merged once at the split: a folded token is gone from both upper layers, so its 2 of 4 token-layers are too
    assert folded > 0 and merged.prompt_tokens == pytest.approx(plain.prompt_tokens - folded * (L - split) / L)
    for result in (plain, merged):
        passages = sum(s["n_tokens"] for s in result.segments if s["kind"] == "passage")
        assert result.processed_tokens <= result.prompt_tokens
        assert result.processed_tokens + result.cached_tokens == pytest.approx(result.prompt_tokens)
        prefix = result.segments[0]["n_tokens"] if result.segments[0]["mark"] == "cached" else 0
        assert result.cached_tokens - prefix == pytest.approx(passages * split / L)  # stored states: never merged
