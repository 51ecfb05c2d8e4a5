"""Attention in query blocks, for bf16 models on CPUs where SDPA's bf16 kernel is slow.

On the AMD EPYC these benches ran on (AVX512-BF16, no AMX), torch's fused CPU attention runs bf16 at the
speed of fp32, ~95 GFLOP/s, while a bf16 matmul reaches ~850: at 1k tokens attention took half of a prefill's
time for a seventh of its FLOPs. This kernel splits the queries into blocks of `BLOCK` rows and, per block and
key head, multiplies against only the keys some row of the block can see (so a causal prefill does a little
over half the work of a full one), masks, takes the softmax and multiplies by the values, as plain products.

Scores stay in fp32 and only the probabilities are rounded to bf16, as in SDPA's kernel, so the result is as
close to exact attention as SDPA's. Rounding the scores to bf16 too (transformers' eager numerics) was 1.5x
faster again but doubled the error in the deep layers and cost LLoCO's distilled LoRA 2 points of value kept
on 100 SQuAD questions; see blocked_attend. The CPU's flags decide at load (choose_attention): SDPA stays for
fp32, CPUs with AMX and GPUs, and every case the kernel does not cover (few query rows, batches, autograd,
biases or sinks, a row with no visible key) is handed to SDPA unchanged.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packed import activation_linear, cached_on

NAME = "ragdemo_blocked"  # the name it is registered under in transformers' AttentionInterface
BLOCK = 128  # query rows per block: 64-256 measured within 10% of each other at 1k-4k tokens, 128 best
MIN_ROWS = 384  # fewer query rows stay on SDPA: below ~300 the per-block, per-head calls cost more than they save
ATTENTION_CHOICES = ("auto", "sdpa", "blocked")  # RAGDEMO_ATTENTION: the CPU's flags decide, or as asked
UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "cache")
SPANS_ATTRIBUTE = "_ragdemo_spans"  # on a mask tensor: (its version, its spans), since every layer gets the same mask


@dataclass(frozen=True)
class Span:
    """What one query block [start, stop) computes: keys [0, end), masked from column `masked_from` on."""

    start: int
    stop: int
    end: int
    masked_from: int


def causal_spans(q_len: int, block: int) -> list[Span]:
    """Top-left causal (no cache before the queries): row i sees keys 0..i."""
    return [Span(a, min(q_len, a + block), min(q_len, a + block), a) for a in range(0, q_len, block)]


def mask_spans(visible: torch.Tensor, block: int) -> list[Span] | None:
    """Spans for an explicit mask ([q, kv] bool, True = attend); None if some row sees no key at all (SDPA's
    answer for such a row is its own)."""
    if not bool(visible.any(-1).all()):
        return None
    spans = []
    for a in range(0, visible.shape[0], block):
        rows = visible[a:a + block]
        end = int(rows.any(0).nonzero()[-1]) + 1
        partial = (~rows[:, :end].all(0)).nonzero()
        spans.append(Span(a, a + rows.shape[0], end, int(partial[0]) if len(partial) else end))
    return spans


def visible_keys(mask: torch.Tensor) -> torch.Tensor:
    """[q, kv] bool from a [1,1,q,kv] bool mask or additive float mask (its smallest value, or -inf, forbids)."""
    rows = mask[0, 0]
    if rows.dtype == torch.bool:
        return rows
    return rows > torch.finfo(rows.dtype).min


def blocked_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   spans: list[Span], scale: float) -> torch.Tensor:
    """query [1,H,q,d], key/value [1,Hkv,kv,d] (grouped-query heads share a key head, as in repeat_kv);
    returns [1,q,H,d], the layout the attention's output projection reads.

    Scores are computed and kept in fp32 (queries and keys upcast, oneDNN's fp32 product): rounding them to
    bf16 doubled the error against exact attention in the deep layers, where scores reach +-16 and a bf16
    ulp is 0.125. Only the probabilities are rounded to bf16 for the product with the values, as SDPA's CPU
    kernel does; the result is as close to exact as SDPA's (tests/test_attention.py)."""
    heads, q_len, dim = query.shape[1:]
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    queries = (query[0].float() * scale).reshape(kv_heads, groups, q_len, dim)
    keys = key[0].to(torch.float32, memory_format=torch.contiguous_format)
    values = value[0]
    out = query.new_empty(1, q_len, heads, dim)
    by_head = out[0].view(q_len, kv_heads, groups, dim)
    for span in spans:
        rows = span.stop - span.start
        forbidden, additive = _block_mask(mask, span, query.device)
        for head in range(kv_heads):
            block = queries[head, :, span.start:span.stop].reshape(groups * rows, dim)
            scores = activation_linear(block, keys[head, :span.end]).view(groups, rows, span.end)
            _apply_mask(scores, span, forbidden, additive)
            probs = torch.softmax(scores, dim=-1).to(value.dtype).view(groups * rows, span.end)
            head_out = torch.matmul(probs, values[head, :span.end]).view(groups, rows, dim)
            by_head[span.start:span.stop, head].copy_(head_out.transpose(0, 1))
    return out


def _block_mask(mask: torch.Tensor | None, span: Span, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(forbidden [rows, end - masked_from] bool, additive [rows, end] fp32) for one span, made once for all
    its key heads; either is None when not needed."""
    if span.masked_from >= span.end:
        return None, None
    if mask is None:  # causal: the block's own diagonal square
        rows = span.stop - span.start
        return torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1), None
    if mask.dtype == torch.bool:
        return ~mask[0, 0, span.start:span.stop, span.masked_from:span.end], None
    # additive: a bias such as ToMe's log(size) can sit on any column, so the whole block gets it (in fp32,
    # -inf or bf16's ~-3e38 stays what it was)
    return None, mask[0, 0, span.start:span.stop, :span.end].float()


def _apply_mask(scores: torch.Tensor, span: Span, forbidden: torch.Tensor | None, additive: torch.Tensor | None):
    if forbidden is not None:
        scores[..., span.masked_from:span.end].masked_fill_(forbidden, float("-inf"))
    if additive is not None:
        scores.add_(additive)


def _spans(query, key, mask, causal: bool) -> list[Span] | None:
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        if not causal:
            return [Span(a, min(q_len, a + BLOCK), kv_len, kv_len) for a in range(0, q_len, BLOCK)]
        return causal_spans(q_len, BLOCK) if kv_len >= q_len else None
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, kv_len):
        return None
    return cached_on(mask, SPANS_ATTRIBUTE, lambda: _mask_spans(mask))


def _mask_spans(mask: torch.Tensor) -> list[Span] | None:
    spans = mask_spans(visible_keys(mask), BLOCK)
    if spans is not None and mask.dtype != torch.bool:  # a float mask is added over each block's keys
        spans = [Span(s.start, s.stop, s.end, 0) for s in spans]
    return spans


def _covered(query, key, dropout: float, kwargs: dict) -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and query.shape[0] == 1
            and query.shape[2] >= MIN_ROWS and query.shape[1] % key.shape[1] == 0 and not dropout
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
            and all(kwargs.get(name) is None for name in UNSUPPORTED_KWARGS))


def blocked_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; anything not covered goes to its SDPA function as is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    spans = _spans(query, key, attention_mask, causal) if _covered(query, key, dropout, kwargs) else None
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return blocked_attend(query, key, value, attention_mask, spans, scale), None


@functools.cache
def register() -> str:
    """Make NAME a transformers attention implementation, with SDPA's mask builder (it takes the same masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, blocked_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def sdpa_for_training(model: torch.nn.Module) -> None:
    """Put a private training copy of the model back on SDPA. Its student runs under autograd, where only SDPA
    applies, so its no-grad teacher runs SDPA too: targets and student share one kernel's rounding, and
    training stays exactly what it was before the blocked kernel existed. Answers still run the blocked one."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")


# ---------------------------------------------------------------- the choice at load
@dataclass(frozen=True)
class AttentionChoice:
    """Which attention the model runs and why: shown in Settings and by bench-speed."""

    blocked: bool
    reason: str


def causal_inputs(heads: int, kv_heads: int, dim: int, tokens: int, dtype: torch.dtype = torch.bfloat16):
    """Random (q, k, v) of a causal prefill of `tokens` at a model's head shape, laid out as the attention's
    projections hand them over ([1, n, heads, d] seen as [1, heads, n, d])."""
    def draw(h):
        return torch.randn(1, tokens, h, dim, dtype=dtype).transpose(1, 2)

    return draw(heads), draw(kv_heads), draw(kv_heads)


def causal_kernels(heads: int, kv_heads: int, dim: int, tokens: int) -> dict:
    """The kernels a causal prefill of `tokens` can run at this head shape, name -> f(q, k, v)."""
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    spans = causal_spans(tokens, BLOCK)
    return {"SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa),
            "blocked": lambda q, k, v: blocked_attend(q, k, v, None, spans, dim ** -0.5)}


def head_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a transformers decoder config."""
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, getattr(config, "num_key_value_heads", None) or heads, dim


def choose_attention(model: torch.nn.Module, dtype: torch.dtype, requested: str = "auto",
                     bf16_flags: tuple[str, ...] = ()) -> AttentionChoice:
    """Which kernel a CPU model runs, from what the CPU supports (its native-bf16 flags), never from a timing
    at load: a probe at 1k tokens read 1.00x to 1.7x across loads of the same model on the same idle machine
    (app start-up runs beside it), so it would flip the choice. `bench-speed` measures both kernels every run.
    `requested` (RAGDEMO_ATTENTION) "sdpa" or "blocked" overrides the rule."""
    config = model.config
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"RAGDEMO_ATTENTION must be one of {ATTENTION_CHOICES}, not {requested!r}")
    if requested == "sdpa":
        return AttentionChoice(False, "SDPA: asked for (RAGDEMO_ATTENTION=sdpa)")
    if dtype != torch.bfloat16:
        return AttentionChoice(False, f"SDPA (the blocked kernel is for bf16; this model runs {dtype})")
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(config, "num_attention_heads"):
        return AttentionChoice(False, f"{getattr(config, '_attn_implementation', 'its own')} (the model's; only "
                                      "SDPA is replaced)")
    if requested == "auto" and "amx_bf16" in bf16_flags:
        return AttentionChoice(False, "SDPA: this CPU has AMX, where SDPA's fused kernel runs bf16 natively")
    if requested == "auto" and "avx512_bf16" not in bf16_flags:
        return AttentionChoice(False, "SDPA: the blocked kernel was measured on x86 AVX512-BF16 without AMX only "
                                      f"(this CPU reports {', '.join(bf16_flags) or 'no native bf16'})")
    model.set_attn_implementation(register())
    why = "asked for (RAGDEMO_ATTENTION=blocked)" if requested == "blocked" else (
        "this CPU has AVX512-BF16 but no AMX, where SDPA's kernel runs bf16 at fp32 speed")
    return AttentionChoice(True, f"blocked (fp32 scores, bf16 values) from {MIN_ROWS} query rows, SDPA below: {why}")
