"""The blocked attention kernel: SDPA's results on every mask ragdemo builds, SDPA itself wherever it does not
apply, and a model switched to it answers as with SDPA."""
import pytest
import torch
import torch.nn.functional as F

from ragdemo.models import attention
from ragdemo.models.attention import BLOCK, MIN_ROWS, NAME, blocked_attention, choose_attention


class Module:  # what transformers passes as `module`: only these attributes are read
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def qkv(q_len: int, kv_len: int, heads: int = 6, kv_heads: int = 2, dim: int = 32, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(h, n):
        return torch.randn(1, n, h, dim, generator=generator).to(dtype).transpose(1, 2)  # a projection's layout

    return draw(heads, q_len), draw(kv_heads, kv_len), draw(kv_heads, kv_len)


def exact(q, k, v, mask, causal=True) -> torch.Tensor:
    """fp64 SDPA with the key heads repeated: [1, q, H, d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out = F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)


def past_causal(q_len: int, kv_len: int) -> torch.Tensor:
    """Queries are the last q_len of kv_len positions, every cached key visible: RAG after the cached prefix."""
    return (torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None])[None, None]


def masks(q_len: int, kv_len: int, dtype) -> dict:
    allowed = past_causal(q_len, kv_len)
    scattered = torch.rand(1, 1, q_len, kv_len, generator=torch.Generator().manual_seed(1)) < 0.3
    scattered[..., 0] = True  # every row sees a key
    bias = torch.zeros(kv_len)
    bias[:40] = torch.linspace(0, 2, 40)  # ToMe's log(size) on merged keys
    additive = torch.where(allowed, bias.to(dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    return {"past causal": allowed, "scattered": scattered, "additive bias": additive}


def run(q, k, v, mask, causal=True):
    """The kernel itself, in any dtype (the model dispatches to it in bf16 only; fp32 checks the blocking and
    masking exactly)."""
    spans = attention._spans(q, k, mask, causal)
    assert spans is not None
    return attention.blocked_attend(q, k, v, mask, spans, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("q_len", [MIN_ROWS, MIN_ROWS + BLOCK // 2 + 1])
@pytest.mark.parametrize("kv_heads", [2, 6])
def test_causal_without_a_mask_matches_sdpa(q_len, kv_heads):
    q, k, v = qkv(q_len, q_len, kv_heads=kv_heads)
    torch.testing.assert_close(run(q, k, v, None).double(), exact(q, k, v, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["past causal", "scattered", "additive bias"])
def test_every_mask_kind_matches_sdpa(kind):
    q, k, v = qkv(MIN_ROWS + 16, MIN_ROWS + 146)
    mask = masks(MIN_ROWS + 16, MIN_ROWS + 146, torch.float32)[kind]
    torch.testing.assert_close(run(q, k, v, mask).double(), exact(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_no_mask_and_not_causal_attends_to_every_key():
    q, k, v = qkv(MIN_ROWS, MIN_ROWS)
    torch.testing.assert_close(run(q, k, v, None, causal=False).double(), exact(q, k, v, None, causal=False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", [(MIN_ROWS, MIN_ROWS), (MIN_ROWS + 16, MIN_ROWS + 146)])
@pytest.mark.parametrize("spread", [1.0, 4.0])  # deep layers' scores reach +-16: there bf16 scores would drift
def test_bf16_is_as_close_to_exact_as_sdpa(q_len, kv_len, spread):
    q, k, v = qkv(q_len, kv_len, dtype=torch.float32)
    q, k, v = (q * spread).bfloat16(), (k * spread).bfloat16(), v.bfloat16()
    mask = past_causal(q_len, kv_len)
    reference = exact(q, k, v, mask)
    blocked_error = (run(q, k, v, mask if kv_len > q_len else None).double() - reference).abs()
    groups = q.shape[1] // k.shape[1]
    sdpa_out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                              attn_mask=mask).transpose(1, 2)
    sdpa_error = (sdpa_out.double() - reference).abs()
    assert float(blocked_error.mean()) <= 1.25 * float(sdpa_error.mean())
    assert float(blocked_error.max()) <= 2 * float(sdpa_error.max())


def sdpa(q, k, v, mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(Module(q.shape[1] // k.shape[1]), q, k, v, mask, **kwargs)[0]


@pytest.mark.parametrize("case", ["few rows", "batch", "autograd", "dropout", "a row sees nothing", "fp32"])
def test_what_it_does_not_cover_goes_to_sdpa_unchanged(case):
    q_len = MIN_ROWS - 1 if case == "few rows" else MIN_ROWS
    q, k, v = qkv(q_len, q_len, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    mask, kwargs = None, {}
    if case == "batch":
        q, k, v = (torch.cat([t, t]) for t in (q, k, v))
    if case == "autograd":
        q.requires_grad_(True)
    if case == "dropout":
        kwargs["dropout"] = 0.5
    if case == "a row sees nothing":
        mask = past_causal(q_len, q_len).clone()
        mask[..., 5, :] = False
    torch.manual_seed(0)
    expected = sdpa(q, k, v, mask, **kwargs)
    torch.manual_seed(0)
    got = blocked_attention(Module(3), q, k, v, mask, **kwargs)[0]
    assert torch.equal(got, expected)


def test_a_mask_written_in_place_gets_new_spans():
    q, k, v = qkv(MIN_ROWS, MIN_ROWS)
    mask = past_causal(MIN_ROWS, MIN_ROWS).clone()
    first = run(q, k, v, mask)
    mask[..., 300:, :50] = False  # the same tensor, new contents: what was planned for it must not be reused
    torch.testing.assert_close(run(q, k, v, mask).double(), exact(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, run(q, k, v, mask))


def bf16_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()


def test_a_model_switched_to_it_gives_sdpa_logits_with_and_without_a_cache(tiny_model_dir):
    from transformers import DynamicCache

    model = bf16_model(tiny_model_dir)
    ids = torch.randint(100, 1000, (1, MIN_ROWS + 100 + 50), generator=torch.Generator().manual_seed(0))
    calls, real = [], attention.blocked_attend

    def counted(*args):
        calls.append(1)
        return real(*args)


    def logits(implementation):
        model.set_attn_implementation(implementation)
        with torch.inference_mode():
            whole = model(input_ids=ids).logits
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :100], past_key_values=cache, use_cache=True)  # a cached prefix, then the rest
            rest = model(input_ids=ids[:, 100:], past_key_values=cache, use_cache=True).logits
        return whole.float(), rest.float()

    reference = logits("sdpa")
    attention.blocked_attend = counted
    try:
        blocked = logits(attention.register())
    finally:
        attention.blocked_attend = real
    assert len(calls) == 2 * model.config.num_hidden_layers  # whole prompt, then the rest after the prefix
    for got, expected in zip(blocked, reference):
        assert float((got - expected).abs().max()) < 0.1 * float(expected.abs().max())
        assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) > 0.95


def test_the_choice_follows_the_cpu_flags_and_the_dtype(tiny_model_dir):
    model = bf16_model(tiny_model_dir)
    for flags, reason in [(("avx512_bf16", "amx_bf16"), "AMX"), ((), "no native bf16"), (("bf16",), "bf16")]:
        choice = choose_attention(model, torch.bfloat16, "auto", flags)
        assert not choice.blocked and reason in choice.reason and model.config._attn_implementation == "sdpa"
    assert not choose_attention(model, torch.float32, "auto", ("avx512_bf16",)).blocked
    choice = choose_attention(model, torch.bfloat16, "auto", ("avx512_bf16",))
    assert choice.blocked and "no AMX" in choice.reason and model.config._attn_implementation == NAME


def test_the_engine_takes_the_no_mask_path_for_it_as_for_sdpa(tiny_lm):
    from ragdemo.engine.layers import CAUSAL, resolve_mask

    tiny_lm.model.set_attn_implementation(attention.register())
    try:
        assert resolve_mask(tiny_lm, CAUSAL, 80, 0) is None
        assert resolve_mask(tiny_lm, CAUSAL, 80, 20).shape == (1, 1, 80, 100)
    finally:
        tiny_lm.model.set_attn_implementation("sdpa")


def test_the_loaded_lm_says_which_attention_runs_and_settings_shows_it(tiny_bench):
    from ragdemo.ui.settings import model_status

    lm = tiny_bench.models.lm
    assert lm.attention.startswith("SDPA (the blocked kernel is for bf16")  # the tiny test model runs fp32
    assert f"Attention: {lm.attention}" in model_status(tiny_bench)


def test_either_kernel_can_be_asked_for_and_a_wrong_value_is_refused(tiny_model_dir, tmp_path):
    from tests.conftest import make_settings
    from ragdemo.models.lm import ModelUnavailable, load_lm

    model = bf16_model(tiny_model_dir)
    choice = choose_attention(model, torch.bfloat16, "sdpa", ("avx512_bf16",))
    assert not choice.blocked and "asked for" in choice.reason and model.config._attn_implementation == "sdpa"
    choice = choose_attention(model, torch.bfloat16, "blocked", ("avx512_bf16", "amx_bf16"))
    assert choice.blocked and "asked for" in choice.reason and model.config._attn_implementation == NAME
    with pytest.raises(ModelUnavailable, match="unknown attention"):
        load_lm(make_settings(tmp_path, tiny_model_dir, attention="flash"))


def test_lora_training_runs_teacher_and_student_on_sdpa_and_leaves_the_shared_model_blocked(tiny_lm):
    from ragdemo.engine.lora import LoraKnobs, train_adapter

    tiny_lm.model.set_attn_implementation(attention.register())
    seen = []

    def loss_of_step(peft_model, student):
        seen.append(student.model.config._attn_implementation)
        return sum(p.sum() for p in peft_model.parameters() if p.requires_grad)

    try:
        train_adapter(tiny_lm, loss_of_step, LoraKnobs(lora_steps=1))
        assert seen == ["sdpa"] and tiny_lm.model.config._attn_implementation == NAME
    finally:
        tiny_lm.model.set_attn_implementation("sdpa")
