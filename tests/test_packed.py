"""Pre-packed oneDNN projections: the same numbers as nn.Linear, autograd untouched, never a stale pack."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ragdemo.models import packed
from ragdemo.models.packed import PackedLinear, pack_model, packed_weight

pytestmark = pytest.mark.skipif(not packed.onednn_available(), reason="this torch build has no oneDNN")


def packed_copy(layer: torch.nn.Linear) -> PackedLinear:
    twin = copy.deepcopy(layer)
    twin.__class__ = PackedLinear
    return twin


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_projection_matches_the_plain_one(dtype, tolerance, rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 160, bias=True).to(dtype)
    x = torch.randn(1, rows, 96).to(dtype)
    with torch.no_grad():
        expected, got = layer(x), packed_copy(layer)(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_autograd_takes_the_plain_path_and_gets_the_same_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 48)
    twin = packed_copy(layer)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).square().sum().backward()
    plain_grads = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = None
    twin(x).square().sum().backward()
    assert torch.equal(x.grad, plain_grads[0]) and torch.equal(twin.weight.grad, plain_grads[1])


def test_an_in_place_write_to_the_weight_is_seen_not_a_stale_pack():
    torch.manual_seed(0)
    layer = packed_copy(torch.nn.Linear(16, 16, bias=False))
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)
        after = layer(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_a_swapped_in_weight_carries_its_own_pack_and_swapping_back_is_exact():
    torch.manual_seed(0)
    layer = packed_copy(torch.nn.Linear(16, 24, bias=False))
    original = layer.weight
    other = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        base = layer(x)
        layer.weight = other  # what a loaded LoRA does: it swaps a merged copy in by reference
        swapped = layer(x)
        layer.weight = original
        back = layer(x)
    torch.testing.assert_close(swapped, F.linear(x, other), rtol=1e-5, atol=1e-5)
    assert torch.equal(back, base)
    assert packed_weight(other) is not packed_weight(original)


def test_a_model_is_packed_only_when_the_probe_says_it_pays(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    monkeypatch.setattr(packed, "probe_speedup", lambda dtype: 1.02)
    choice = pack_model(model, torch.float32)
    assert not choice.packed and "1.02x" in choice.reason
    assert all(type(m) is torch.nn.Linear for m in model if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(packed, "probe_speedup", lambda dtype: 2.5)
    choice = pack_model(model, torch.float32)
    assert choice.packed and "2.5x faster" in choice.reason and choice.extra_bytes == (64 + 32) * 4
    assert [type(m) for m in model] == [PackedLinear, torch.nn.ReLU, PackedLinear]


def test_a_model_too_big_for_the_memory_share_is_not_packed(monkeypatch):
    monkeypatch.setattr(packed, "physical_memory", lambda: 1000)
    choice = pack_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), torch.float32)
    assert not choice.packed and "memory" in choice.reason


def test_the_probe_measures_a_ratio():
    assert packed.probe_speedup(torch.float32, rounds=2) > 0


def test_a_packed_model_gives_the_logits_of_the_plain_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    twin = copy.deepcopy(plain)
    for module in packed.plain_linears(twin):
        module.__class__ = PackedLinear
    ids = torch.randint(5, 1000, (1, 40))
    with torch.inference_mode():
        torch.testing.assert_close(twin(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_loaded_lm_and_embedder_say_whether_they_are_packed(tiny_lm):
    from ragdemo.models.embedder import load_embedder

    assert tiny_lm.packing.startswith(("weights pre-packed", "weights not packed"))
    assert load_embedder().packing.startswith(("weights pre-packed", "weights not packed"))


def test_the_allocator_setting_says_what_it_did():
    import sys

    from ragdemo.models.allocator import keep_freed_memory

    said = keep_freed_memory()
    assert said.startswith("allocator:")
    if sys.platform.startswith("linux"):
        assert "glibc keeps freed memory" in said
