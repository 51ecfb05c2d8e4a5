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
