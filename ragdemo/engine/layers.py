"""Forward over any range of decoder layers of a Llama-family model (Llama, Qwen2, Mistral, SmolLM).

BTR runs layers [0, k) and [k, L) at different times, LLoCO prefills pieces separately; both go through here
so the internals of transformers are touched in one place only.
"""
from __future__ import annotations

import torch

from ..errors import NotSupported
from ..models.attention import NAME as BLOCKED_ATTENTION


def require_llama_like(lm, method: str) -> None:
    if not lm.is_llama_like:
        raise NotSupported(
            f"{method} needs a Llama-family decoder (Llama, Qwen2, Mistral, SmolLM); "
            f"'{lm.model_id}' is {lm.model.config.model_type}"
        )


def embed(lm, ids: torch.Tensor) -> torch.Tensor:
    return lm.model.model.embed_tokens(ids.to(lm.device))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_kv(lm, index: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """The keys (RoPE applied) and values [1, H_kv, q, d] decoder layer `index` would write into its cache for
    `hidden` [1, q, D], without running its attention or MLP: what a KV comparison needs, ~1/6 of a layer."""
    layer = lm.model.model.layers[index]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(x).view(shape)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3 normalises each head before RoPE
        keys = attn.k_norm(keys)
    keys, values = keys.transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in rope)
    return keys * cos + rotate_half(keys) * sin, values


def positions(start: int, count: int, device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device).unsqueeze(0)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[1,1,q,kv] bool, True = attend; queries are the last q_len of kv_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    return (k_pos <= q_pos)[None, None]


CAUSAL = "causal"  # run_layers mask: causal over what the cache holds plus the new tokens


def resolve_mask(lm, mask, q_len: int, past: int):
    """CAUSAL becomes no mask where SDPA's own causal kernel (or models/attention.py's blocked one) applies: no
    cached keys before the queries, so its top-left alignment is right. Measured faster than an explicit mask
    on this CPU, and exact. Otherwise the explicit [1,1,q,kv] mask."""
    if not isinstance(mask, str):
        return mask
    if q_len == 1:
        return None
    if past == 0 and lm.model.config._attn_implementation in ("sdpa", BLOCKED_ATTENTION):
        return None
    return causal_mask(q_len, past + q_len, lm.device)


def as_model_mask(lm, allowed: torch.Tensor | None, dtype: torch.dtype):
    """sdpa takes bool masks; eager attention wants an additive float mask."""
    if allowed is None or lm.model.config._attn_implementation != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def sliding_window(lm) -> int | None:
    """The smallest sliding attention window any layer uses (Mistral v0.1, Qwen2/3 with use_sliding_window), or None."""
    config = lm.model.config
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in lm.model.model.layers]
    if config.model_type == "mistral":  # Mistral's attention reads the window from the config, every layer
        windows.append(getattr(config, "sliding_window", None))
    windows = [int(w) for w in windows if w]
    return min(windows) if windows else None


def check_window(lm, kv_len: int) -> None:
    """The engine builds full causal masks (BTR's and LLoCO's caches do not hold keys at contiguous positions),
    so a span longer than a sliding window would silently attend further than the model was trained to."""
    window = sliding_window(lm)
    if window is not None and kv_len > window:
        raise NotSupported(f"{lm.model_id} uses sliding-window attention ({window} tokens) and this prompt spans "
                           f"{kv_len}; the engine's layer-by-layer paths attend to the full span, so they stop here. "
                           "Use fewer or shorter passages, or a model without a sliding window.")


def run_layers(lm, hidden: torch.Tensor, start: int, end: int, pos: torch.Tensor,
               mask: torch.Tensor | None = None, cache=None,
               key_bias: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Run decoder layers [start, end). `mask` is bool [1,1,q,kv], CAUSAL, or None (single-token decode only).

    `key_bias` {layer: [m] floats} is added to that layer's attention logits for its first m keys (what its cache
    held, then the new tokens; later keys get 0): ToMe's proportional attention, log(size) for merged tokens."""
    inner = lm.model.model
    past = cache.get_seq_length(start) if cache is not None else 0
    resolved = resolve_mask(lm, mask, hidden.shape[1], past)
    check_window(lm, resolved.shape[-1] if resolved is not None else past + hidden.shape[1])
    rope = inner.rotary_emb(hidden, position_ids=pos)
    model_mask = as_model_mask(lm, resolved, hidden.dtype)
    for index in range(start, end):
        layer_mask = model_mask
        if key_bias and index in key_bias:
            layer_past = cache.get_seq_length(index) if cache is not None else 0
            layer_mask = biased_mask(mask, key_bias[index], hidden.shape[1], layer_past, hidden.dtype, lm.device)
        hidden = inner.layers[index](hidden, attention_mask=layer_mask, position_ids=pos, past_key_values=cache,
                                     use_cache=cache is not None, position_embeddings=rope)
    return hidden


def biased_mask(mask, bias: torch.Tensor, q_len: int, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An additive float mask [1,1,q,kv]: `bias` on the first keys (zero after), the smallest float where `mask`
    forbids. sdpa and eager attention both add a float mask to the logits before the softmax."""
    kv_len = past + q_len
    if isinstance(mask, torch.Tensor):
        allowed = mask
    elif mask == CAUSAL:
        allowed = causal_mask(q_len, kv_len, device)
    else:  # no mask: a single decoded token attends to the whole cache
        allowed = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    per_key = torch.zeros(kv_len, dtype=dtype, device=device)
    per_key[:len(bias)] = bias.to(device, dtype)
    return torch.where(allowed, per_key, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


def logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    return lm.model.lm_head(lm.model.model.norm(hidden))


def forward_all(lm, ids: torch.Tensor, cache=None, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
    """Every layer, causal over what `cache` already holds plus `ids`; returns logits, of the last position only
    with `last_only` (all a next token needs: the vocabulary projection is ~20% of a short prefill)."""
    q = ids.shape[-1]
    h = embed(lm, ids)
    pos = positions(start_pos, q, lm.device)
    hidden = run_layers(lm, h, 0, lm.n_layers, pos, CAUSAL, cache)
    return logits(lm, hidden[:, -1:] if last_only else hidden)


def attention_from(lm, hidden_in: torch.Tensor, layer: int, pos: torch.Tensor, rows: slice) -> torch.Tensor:
    """Layer `layer`'s causal attention probabilities [heads, len(rows), keys] from the query positions `rows`
    to every key up to the last of them, recomputed from the layer's input states `hidden_in` [1, n, d] (SDPA
    never returns its weights; this avoids switching the shared model to eager attention). Same projections,
    q/k norms (Qwen3), RoPE and scaling as the layer itself."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    block = lm.model.model.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(hidden_in)
    end = rows.stop if rows.stop is not None else x.shape[1]
    x = x[:, :end]

    def heads(proj, norm, part):
        out = proj(part).view(1, part.shape[1], -1, attn.head_dim)
        return (norm(out) if norm is not None else out).transpose(1, 2)

    q = heads(attn.q_proj, getattr(attn, "q_norm", None), x)
    k = heads(attn.k_proj, getattr(attn, "k_norm", None), x)
    cos, sin = lm.model.model.rotary_emb(x, position_ids=pos[:, :end])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q[:, :, rows] @ k.transpose(-1, -2)) * attn.scaling
    allowed = causal_mask(end, end, x.device)[:, :, rows]
    return torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1)[0]
