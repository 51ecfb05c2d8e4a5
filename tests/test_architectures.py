"""The engine paths BTR and LLoCO use, on tiny random configs of every architecture `is_llama_like` accepts:
Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q_norm/k_norm) and Mistral (sliding window)."""
from __future__ import annotations

import pytest
import torch

from ragdemo.engine import kv as kvc
from ragdemo.engine.layers import embed, forward_all
from ragdemo.engine.generate import decode_loop, generate
from ragdemo.errors import NotSupported
from ragdemo.engine.prefix import instruction_ids
from ragdemo.methods.btr import btr_forward, decode_step
from ragdemo.models import load_lm

from .conftest import make_settings

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


def _config(arch: str, vocab: int, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, **SHAPE, **extra)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, **SHAPE, **extra)
    if arch == "qwen3":  # Qwen3's head_dim is its own knob (128 by default)
        return Qwen3Config(vocab_size=vocab, head_dim=16, **SHAPE, **extra)
    if arch == "mistral":
        return MistralConfig(vocab_size=vocab, sliding_window=extra.pop("sliding_window", 4096), **SHAPE, **extra)
    raise ValueError(arch)


def _save_tiny(tmp_path_factory, default_model_dir, arch: str, **extra) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer), **extra))
    with torch.no_grad():  # random init leaves RMSNorm weights at exactly 1: make q_norm/k_norm really matter
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.2, 3.0)
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def arch_dir(request, tmp_path_factory, default_model_dir):
    return request.param, _save_tiny(tmp_path_factory, default_model_dir, request.param)


@pytest.fixture
def arch_lm(arch_dir, tmp_path):
    arch, path = arch_dir
    lm = load_lm(make_settings(tmp_path / "home", path))
    assert lm.model.config.model_type == arch and lm.is_llama_like
    return lm


def _ids(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def _parts(lm):
    passages = [_ids(lm, "The Eiffel Tower was completed in 1889.\n\n"), _ids(lm, "Bananas are yellow.\n\n")]
    return instruction_ids(lm), passages, _ids(lm, "Question: When was it completed?\nAnswer:")


def test_btr_split_zero_with_float_states_equals_the_full_forward(arch_lm):
    prefix, passages, question = _parts(arch_lm)
    ids = prefix + passages[0] + passages[1] + question
    states = [embed(arch_lm, torch.tensor([p]))[0].float() for p in passages]
    with torch.inference_mode():
        full = arch_lm.model(input_ids=torch.tensor([ids])).logits
        fwd = btr_forward(arch_lm, prefix, states, question, split=0, want=len(question))
    torch.testing.assert_close(fwd.logits, full[:, -len(question):], atol=1e-4, rtol=1e-4)
    assert fwd.token_layers == len(ids) * arch_lm.n_layers
    # and generation through BTR's per-layer cache matches plain generation token for token
    plain = generate(arch_lm, ids, 6, 0.0)
    btr = decode_loop(arch_lm, fwd.cache, fwd.logits[:, -1:], fwd.next_pos, 6, 0.0, step=decode_step(arch_lm))
    assert btr.ids == plain.ids


def test_lloco_ratio_one_gives_the_full_forward_logits(arch_lm):
    """Prefix cache + one passage captured alone behind it (keys made position-free, kept at c=1, re-rotated)
    + the question prefilled on top: the same logits as the plain model over the whole prompt."""
    prefix_tokens, passages, question = _parts(arch_lm)
    prefix = kvc.prefix_layers(arch_lm, prefix_tokens)
    passage, _ = kvc.capture(arch_lm, prefix, passages[0])
    passage = kvc.compress(passage, kvc.keynorm_scores(passage), 1)
    start = len(prefix_tokens)
    layers = kvc.placed_layers(arch_lm, prefix, [passage], [start])
    with torch.inference_mode():
        got = forward_all(arch_lm, torch.tensor([question]), kvc.cache_from(layers), start + len(passages[0]))
        want = arch_lm.model(input_ids=torch.tensor([prefix_tokens + passages[0] + question])).logits
    torch.testing.assert_close(got, want[:, -len(question):], atol=1e-4, rtol=1e-4)


def test_lloco_rerotated_keys_equal_keys_computed_at_the_new_position(arch_lm):
    """RoPE is relative: a whole sequence shifted by s has every key rotated by s and identical values."""
    ids = _ids(arch_lm, "Gustave Eiffel's company built the tower in Paris.")
    at_0, at_37 = kvc.cache_from([]), kvc.cache_from([])
    with torch.inference_mode():
        kvc.prefill(arch_lm, ids, at_0, 0)
        kvc.prefill(arch_lm, ids, at_37, 37)
    shift = torch.full((1, at_0.layers[0].keys.shape[1], len(ids)), 37)
    for a, b in zip(at_0.layers, at_37.layers):
        assert not torch.allclose(a.keys, b.keys, atol=1e-3)  # the shift really changes the keys
        torch.testing.assert_close(kvc.rotate_keys(arch_lm, a.keys, shift), b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)


def test_reconstruct_scores_are_the_models_own_attention(arch_dir, tmp_path):
    """The `reconstruct` scorer recomputes attention from tapped queries; it must equal the attention weights
    the model itself computes (eager attention exposes them). Qwen3 normalises queries per head before RoPE:
    a tap that skips q_norm gets other weights."""
    arch, path = arch_dir
    lm = load_lm(make_settings(tmp_path / "home", path))
    eager = type(lm)(**{**lm.__dict__})  # same weights and tokenizer, eager attention for the reference
    from transformers import AutoModelForCausalLM

    eager.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prefix_tokens, passages, _ = _parts(lm)
    cue = _ids(lm, kvc.RECONSTRUCT_CUE) + passages[0]
    prefix = kvc.prefix_layers(lm, prefix_tokens)
    _, scores = kvc.capture(lm, prefix, passages[0], _ids(lm, kvc.RECONSTRUCT_CUE))
    start, n, r = len(prefix_tokens), len(passages[0]), len(cue)
    with torch.inference_mode():
        out = eager.model(input_ids=torch.tensor([prefix_tokens + passages[0] + cue]), output_attentions=True)
    kv_heads = lm.model.config.num_key_value_heads
    for layer, weights in enumerate(out.attentions):  # [1, Hq, T, T]
        want = weights[0, :, -r:, start:start + n].amax(dim=1)  # [Hq, n]: most attention any repeat token pays
        want = want.view(kv_heads, -1, n).amax(dim=1)
        torch.testing.assert_close(scores[layer], want, atol=1e-5, rtol=1e-4)


def test_a_sliding_window_shorter_than_the_prompt_is_refused_not_silently_ignored(tmp_path_factory, tmp_path,
                                                                                      default_model_dir):
    path = _save_tiny(tmp_path_factory, default_model_dir, "mistral", sliding_window=8)
    lm = load_lm(make_settings(tmp_path / "home", path))
    prefix, passages, question = _parts(lm)
    states = [embed(lm, torch.tensor([p]))[0].float() for p in passages]
    with pytest.raises(NotSupported, match="sliding-window"), torch.inference_mode():
        btr_forward(lm, prefix, states, question, split=0)
    with torch.inference_mode():  # within the window the engine path is exact, as for the other architectures
        short = _ids(lm, "Bananas are yellow.")[:8]
        torch.testing.assert_close(forward_all(lm, torch.tensor([short])), lm.model(input_ids=torch.tensor([short])).logits,
                                   atol=1e-4, rtol=1e-4)
