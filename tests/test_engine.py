import torch
from transformers import DynamicCache

from ragdemo.engine import layers
from ragdemo.engine.generate import decode_loop, generate


def test_engine_forward_equals_model(tiny_lm):
    ids = torch.randint(5, 1000, (1, 37))
    with torch.inference_mode():
        reference = tiny_lm.model(input_ids=ids).logits
        ours = layers.forward_all(tiny_lm, ids)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_layer_ranges_compose_with_a_cache(tiny_lm):
    """Prefix through the engine with a cache, then the rest: same logits as one full pass."""
    ids = torch.randint(5, 1000, (1, 30))
    cache = DynamicCache()
    with torch.inference_mode():
        layers.forward_all(tiny_lm, ids[:, :20], cache)
        tail = layers.forward_all(tiny_lm, ids[:, 20:], cache, start_pos=20)
        reference = tiny_lm.model(input_ids=ids).logits[:, 20:]
    torch.testing.assert_close(tail, reference, atol=1e-4, rtol=1e-4)


def test_split_layers_equal_full_forward(tiny_lm):
    ids = torch.randint(5, 1000, (1, 12))
    pos = layers.positions(0, 12, tiny_lm.device)
    mask = layers.causal_mask(12, 12, tiny_lm.device)
    with torch.inference_mode():
        h = layers.embed(tiny_lm, ids)
        h = layers.run_layers(tiny_lm, h, 0, 2, pos, mask)
        h = layers.run_layers(tiny_lm, h, 2, tiny_lm.n_layers, pos, mask)
        torch.testing.assert_close(layers.logits(tiny_lm, h), tiny_lm.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_decode_matches_hf_generate(tiny_lm, monkeypatch):
    from ragdemo.models.lm import LM

    ids = torch.randint(5, 1000, (1, 10))
    with torch.inference_mode():
        reference = tiny_lm.model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 10:].tolist()
    monkeypatch.setattr(LM, "eos_ids", property(lambda self: set()))  # compare raw token streams, no early stop
    streamed = []
    cache = DynamicCache()
    with torch.inference_mode():
        first = layers.forward_all(tiny_lm, ids, cache)
    out = decode_loop(tiny_lm, cache, first, 10, 6, 0.0, stream=streamed.append)
    full = generate(tiny_lm, ids[0].tolist(), 6, 0.0)
    assert out.ids == reference == full.ids
    assert "".join(streamed).strip() == out.text


def test_sampling_is_seeded(tiny_lm):
    from ragdemo.engine.generate import Sampling, next_token

    logits = torch.randn(1, 1, 500)
    a = [next_token(logits, Sampling(1.0, 0.9, 0), torch.Generator().manual_seed(0)) for _ in range(3)]
    b = [next_token(logits, Sampling(1.0, 0.9, 0), torch.Generator().manual_seed(0)) for _ in range(3)]
    assert a == b
    assert next_token(logits, Sampling(), None) == int(logits[0, -1].argmax())


def test_top_p_keeps_only_the_nucleus():
    """Token 0 holds 82.6% of the mass, tokens 1-2 5.0% each, the other 97 tokens 7.3%: top_p=0.8 may only ever
    pick token 0, top_p=0.9 only tokens 0-2; sampling that ignored top_p would pick the others within 300 draws."""
    from ragdemo.engine.generate import Sampling, next_token

    logits = torch.full((1, 1, 100), -2.0)
    logits[0, 0, 0], logits[0, 0, 1:3] = 5.0, 2.2
    generator = torch.Generator().manual_seed(0)
    assert {next_token(logits, Sampling(1.0, 0.8), generator) for _ in range(300)} == {0}
    assert {next_token(logits, Sampling(1.0, 0.9), generator) for _ in range(300)} == {0, 1, 2}
    assert max(next_token(logits, Sampling(1.0, 1.0), generator) for _ in range(300)) > 2


def test_last_position_logits_equal_the_full_computation(tiny_lm):
    ids = torch.randint(5, 1000, (1, 33))
    cache_full, cache_last = DynamicCache(), DynamicCache()
    with torch.inference_mode():
        layers.forward_all(tiny_lm, ids[:, :9], cache_full)
        layers.forward_all(tiny_lm, ids[:, :9], cache_last)
        full = layers.forward_all(tiny_lm, ids[:, 9:], cache_full, start_pos=9)
        last = layers.forward_all(tiny_lm, ids[:, 9:], cache_last, start_pos=9, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_causal_fast_path_equals_the_explicit_mask(tiny_lm):
    """CAUSAL without cached keys runs SDPA's is_causal kernel; after cached keys it must build the mask."""
    ids = torch.randint(5, 1000, (1, 40))
    pos = layers.positions(0, 40, tiny_lm.device)
    assert layers.resolve_mask(tiny_lm, layers.CAUSAL, 40, 0) is None
    assert layers.resolve_mask(tiny_lm, layers.CAUSAL, 40, 7).shape == (1, 1, 40, 47)
    with torch.inference_mode():
        h = layers.embed(tiny_lm, ids)
        explicit = layers.run_layers(tiny_lm, h, 0, tiny_lm.n_layers, pos, layers.causal_mask(40, 40, tiny_lm.device))
        fast = layers.run_layers(tiny_lm, h, 0, tiny_lm.n_layers, pos, layers.CAUSAL)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def _rag_like_ids(lm, question="Where is the tower?"):
    from ragdemo.engine.prompt import build_prompt

    return build_prompt(lm.tokenizer, question, [{"text": "The tower is in Paris. It is made of iron."}]).ids


def test_prefill_after_the_cached_prefix_equals_the_uncached_path(tiny_lm, monkeypatch):
    from ragdemo.engine.prefix import PrefixCache, prefix_cache
    from ragdemo.engine.prompt import shared_prefixes
    from ragdemo.models.lm import LM

    monkeypatch.setattr(tiny_lm, "prefix_cache", PrefixCache())
    monkeypatch.setattr(LM, "eos_ids", property(lambda self: set()))
    ids = _rag_like_ids(tiny_lm)
    prefix = shared_prefixes(tiny_lm.tokenizer)[0]
    cache, start, hit = prefix_cache(tiny_lm).start(tiny_lm, ids)
    assert (start, hit) == (len(prefix), False)  # first use: computed now
    with torch.inference_mode():
        reference = tiny_lm.model(input_ids=torch.tensor([ids])).logits[:, -1:]
        cached = tiny_lm.model(input_ids=torch.tensor([ids[start:]]), past_key_values=cache, use_cache=True).logits[:, -1:]
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)
    first = generate(tiny_lm, ids, 6, 0.0)
    second = generate(tiny_lm, _rag_like_ids(tiny_lm), 6, 0.0)
    other = generate(tiny_lm, _rag_like_ids(tiny_lm, "Who built it?"), 6, 0.0)
    with torch.inference_mode():
        plain = tiny_lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert first.ids == second.ids == plain[0, len(ids):].tolist()
    assert first.cached_tokens == second.cached_tokens == other.cached_tokens == len(prefix)
    assert len(tiny_lm.prefix_cache.items) == 1  # one entry per exact prefix, shared by every question


def test_prefix_cache_is_keyed_by_prefix_adapter_and_model(tiny_lm, monkeypatch):
    from ragdemo.engine.lora import applied_adapter
    from ragdemo.engine.prefix import PrefixCache, shared_prefix
    from ragdemo.engine.prompt import build_prompt, shared_prefixes
    from tests.test_lora import random_adapter

    monkeypatch.setattr(tiny_lm, "prefix_cache", PrefixCache())
    retrieval, _, closed = shared_prefixes(tiny_lm.tokenizer)  # the bare system turn (JRT) is the middle one
    closed_ids = build_prompt(tiny_lm.tokenizer, "Where?", []).ids
    assert tiny_lm.prefix_cache.shared_prefix(tiny_lm, closed_ids) == closed  # closed book: the bare system turn
    base = shared_prefix(tiny_lm, retrieval)
    with applied_adapter(tiny_lm, random_adapter(tiny_lm, 5)):
        adapted = shared_prefix(tiny_lm, retrieval)
    assert base.fresh and adapted.fresh and not shared_prefix(tiny_lm, retrieval).fresh
    assert not torch.allclose(adapted.layers[-1][0], base.layers[-1][0])  # a LoRA changes the prefix's states
    monkeypatch.setattr(tiny_lm, "model", torch.nn.Module())  # another model object: nothing cached applies
    assert not tiny_lm.prefix_cache.has(tiny_lm, retrieval) and not tiny_lm.prefix_cache.items


def test_prefix_cache_keeps_a_prefix_per_adapter_for_many_adapters(tiny_lm, monkeypatch):
    """A bench compares a dozen LoRA variants question by question: each one's prefix must still be cached when
    its turn comes round again, or its TTFT would include recomputing the prefix (and depend on the order)."""
    from ragdemo.engine.lora import applied_adapter
    from ragdemo.engine.prefix import PrefixCache, shared_prefix
    from ragdemo.engine.prompt import shared_prefixes
    from tests.test_lora import random_adapter

    monkeypatch.setattr(tiny_lm, "prefix_cache", PrefixCache())
    retrieval = shared_prefixes(tiny_lm.tokenizer)[0]
    adapters = [random_adapter(tiny_lm, seed) for seed in range(12)]
    for round_ in range(2):
        for adapter in adapters:
            with applied_adapter(tiny_lm, adapter):
                assert shared_prefix(tiny_lm, retrieval).fresh == (round_ == 0)
    assert len(tiny_lm.prefix_cache.items) == 12
    tiny_lm.prefix_cache.items.max_size = 3 * shared_prefix(tiny_lm, retrieval).nbytes  # the bound is in bytes
    with applied_adapter(tiny_lm, random_adapter(tiny_lm, 99)):
        shared_prefix(tiny_lm, retrieval)
    assert len(tiny_lm.prefix_cache.items) == 3


def test_btr_forward_after_a_cached_prefix_equals_computing_it(tiny_lm):
    from ragdemo.engine.prefix import compute_prefix
    from ragdemo.methods.btr import btr_forward, lower_states

    ids = _rag_like_ids(tiny_lm)
    prefix = build = ids[:25]
    passages, question = [ids[25:33], ids[33:40]], ids[40:]
    states = [lower_states(tiny_lm, build, p, 2) for p in passages]
    with torch.inference_mode():
        computed = btr_forward(tiny_lm, prefix, states, question, 2, want=3, r_p=0.25, merge_layer=3)
        cached = btr_forward(tiny_lm, prefix, states, question, 2, want=3, r_p=0.25, merge_layer=3,
                             prefix=compute_prefix(tiny_lm, prefix).layers)
    torch.testing.assert_close(cached.logits, computed.logits, atol=1e-4, rtol=1e-4)
    assert computed.token_layers - cached.token_layers == len(prefix) * tiny_lm.n_layers
    assert [layer.keys.shape[-2] for layer in cached.cache.layers] == [layer.keys.shape[-2] for layer in computed.cache.layers]


def test_lloco_reads_the_prefix_every_method_shares(tiny_lm, monkeypatch):
    from ragdemo.engine.prefix import PrefixCache
    from ragdemo.methods.lloco import Lloco

    monkeypatch.setattr(tiny_lm, "prefix_cache", PrefixCache())
    generate(tiny_lm, _rag_like_ids(tiny_lm), 2, 0.0)  # a rag-style answer fills the cache
    [state] = tiny_lm.prefix_cache.items.values()
    prefix_ids, layers_ = Lloco._prefix(tiny_lm)
    assert prefix_ids == state.ids and layers_ is state.layers
