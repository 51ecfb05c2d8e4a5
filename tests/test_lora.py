"""Collection adapters switch on and off by reference: loaded once, exact while on, and the base model untouched."""
import pytest
import torch

from ragdemo.engine.lora import AdapterCache, _peft_layer, adapter_bytes, adapter_cache, applied_adapter, trainable_lora


def random_adapter(lm, seed: int, layers=None) -> bytes:
    """A LoRA whose B is random (peft initialises B to zero, which would change nothing)."""
    torch.manual_seed(seed)
    with trainable_lora(lm, r=4, alpha=8, layers=layers) as peft_model:
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
        return adapter_bytes(peft_model, 4, 8)


def logits_of(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits


def merged_reference(lm, blob) -> torch.Tensor:
    """What the adapter means: W + (alpha/r)·B·A in every adapted projection (a copy of the model, merged)."""
    import copy

    from safetensors.torch import load

    tensors = load(blob)
    model = copy.deepcopy(lm.model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A"):
                name = key[: -len(".lora_A")]
                modules[name].weight += (tensors[f"{name}.lora_B"] @ a) * 2.0
    return model


def test_adapter_switches_without_touching_the_base_model(tiny_lm):
    blob = random_adapter(tiny_lm, 0)
    ids = torch.randint(5, 1000, (1, 21))
    weights_before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    base = logits_of(tiny_lm, ids)
    with applied_adapter(tiny_lm, blob):
        adapted = logits_of(tiny_lm, ids)
    between = logits_of(tiny_lm, ids)  # another method answering between two adapted answers
    with applied_adapter(tiny_lm, blob):
        again = logits_of(tiny_lm, ids)
    after = logits_of(tiny_lm, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter really acts
    assert torch.equal(between, base) and torch.equal(after, base)  # bit for bit
    assert torch.equal(again, adapted)
    assert all(torch.equal(p, weights_before[n]) for n, p in tiny_lm.model.named_parameters())
    with torch.inference_mode():
        reference = merged_reference(tiny_lm, blob)(input_ids=ids).logits
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=1e-5)


def test_adapter_is_loaded_once_per_content_and_bounded(tiny_lm):
    cache = AdapterCache()
    one, two = random_adapter(tiny_lm, 1), random_adapter(tiny_lm, 2, layers=[2, 3])
    first = cache.get(tiny_lm, one)
    assert cache.get(tiny_lm, bytes(one)) [1] is first[1]  # same content, other bytes object: not reloaded
    assert cache.get(tiny_lm, two)[0] != first[0] and len(cache.items) == 2
    small = AdapterCache(max_bytes=1)
    small.get(tiny_lm, one)
    small.get(tiny_lm, two)
    assert list(small.items) == [small.get(tiny_lm, two)[0]]  # the least recently used was dropped
    assert adapter_cache(tiny_lm) is tiny_lm.adapters  # owned by the LM object


def test_only_adapted_layers_change_and_nesting_is_refused(tiny_lm):
    blob = random_adapter(tiny_lm, 3, layers=[3])
    layer0 = tiny_lm.model.model.layers[0].self_attn.q_proj
    layer3 = tiny_lm.model.model.layers[3].self_attn.q_proj
    w0, w3 = layer0.weight, layer3.weight
    with applied_adapter(tiny_lm, blob):
        assert layer0.weight is w0 and layer3.weight is not w3
        with pytest.raises(RuntimeError):
            with applied_adapter(tiny_lm, blob):
                pass
    assert layer3.weight is w3 and tiny_lm.adapters.active is None


def test_peft_layer_path_for_weights_that_cannot_be_merged(tiny_lm):
    """Quantized (bitsandbytes) projections are wrapped in peft's own LoRA layer instead of merged: on a plain
    Linear the wrapper computes the same as the merged weight."""
    base = tiny_lm.model.model.layers[1].self_attn.v_proj
    a, b = torch.randn(4, base.in_features), torch.randn(base.out_features, 4)
    layer = _peft_layer(tiny_lm, base, a, b, 4, 8.0)
    x = torch.randn(3, base.in_features)
    with torch.inference_mode():
        expected = x @ (base.weight + 2.0 * b @ a).T
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert layer.base_layer is base


def test_a_stored_adapter_is_read_once_and_a_rewrite_is_loaded_again(tiny_lm, tmp_path):
    """Answers pass the store's reference: an adapter already loaded is neither read nor hashed again, and a
    retrained adapter under the same key (a new write) is a new entry."""
    from ragdemo.store import Store

    store = Store(tmp_path)
    store.put_artifact("m", "model", "h", "lora:x", random_adapter(tiny_lm, 0))
    tiny_lm.adapters = AdapterCache()  # the LM is shared between tests: count this test's adapters only
    reads = []
    ref = store.artifact_ref("m", "model", "h", "lora:x")
    counted = type(ref)(ref.identity, ref.nbytes, lambda: reads.append(1) or ref.read())
    for _ in range(3):
        with applied_adapter(tiny_lm, counted):
            pass
    assert len(reads) == 1 and len(counted) == len(random_adapter(tiny_lm, 0))
    store.put_artifact("m", "model", "h", "lora:x", random_adapter(tiny_lm, 1))  # retrained: same key
    again = store.artifact_ref("m", "model", "h", "lora:x")
    assert again.identity != ref.identity
    with applied_adapter(tiny_lm, again):
        weights = {n: p.clone() for n, p in tiny_lm.model.named_parameters()}
    with applied_adapter(tiny_lm, random_adapter(tiny_lm, 1)):  # the same content given as bytes
        assert all(torch.equal(p, weights[n]) for n, p in tiny_lm.model.named_parameters())
    assert len(adapter_cache(tiny_lm).items) == 3  # seed 0 by reference; seed 1 by reference and by bytes
    assert store.artifact_ref("m", "model", "h", "nope") is None
