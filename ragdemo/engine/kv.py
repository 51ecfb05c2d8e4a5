"""Per-passage KV caches: capture after a shared prefix, query-agnostic compression, storage, RoPE re-rotation.

A passage's cache is computed once, offline, behind the instruction prefix. Keys are stored *position-free*
(RoPE rotated back to position 0), so at answer time every kept key is rotated to wherever the passage lands
in the new prompt: one rotation, whatever the passage's old position was (kvpress calls this key re-rotation).
Compression keeps the same number of tokens in every layer and KV head, so the assembled cache is an ordinary
rectangular `DynamicCache` and the usual causal mask and decode loop work unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy
from transformers import DynamicCache

from .layers import causal_mask, embed, positions, rotate_half, run_layers
from .safetensors_meta import safetensors_metadata

SCORERS = ("keynorm", "reconstruct")
STORAGE_DTYPES = ("fp16", "int8", "k8v4", "int4")
RECONSTRUCT_CUE = "\n\nRepeat the previous context exactly.\n"


@dataclass
class PassageKV:
    """One passage's cache: keys without RoPE, values, and each kept token's index inside the passage."""

    keys: torch.Tensor  # [L, H, n_kept, d]
    values: torch.Tensor  # [L, H, n_kept, d]
    offsets: torch.Tensor  # [L, H, n_kept] long, 0-based token index within the passage
    n_tokens: int  # passage length before compression

    @property
    def kept(self) -> int:
        return int(self.keys.shape[2])


# ------------------------------------------------------------------ RoPE
def _rotation(lm, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-rotation cos/sin for any-shaped integer positions -> shape pos.shape + (head_dim,), float32.

    The model's own rotary module is used, so scaled RoPE variants (Llama 3, NTK) rotate the way the model does;
    its attention_scaling factor is divided out because a re-rotation must not rescale keys twice."""
    rotary = lm.model.model.rotary_emb
    flat = pos.reshape(-1).to(lm.device)
    if flat.numel() == 0:
        low = 0
        span = flat.unsqueeze(0)
    else:  # a cache repeats each position in every layer and head: rotate the distinct span once, then gather
        low = int(flat.min())
        span = torch.arange(low, int(flat.max()) + 1, device=lm.device).unsqueeze(0)
    dummy = torch.zeros(1, dtype=torch.float32, device=lm.device)
    cos, sin = rotary(dummy, position_ids=span)
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    index = flat - low
    shape = (*pos.shape, cos.shape[-1])
    return ((cos[0].float() / scale).index_select(0, index).reshape(shape),
            (sin[0].float() / scale).index_select(0, index).reshape(shape))


def rotate_keys(lm, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate keys by RoPE angle `pos` (same leading shape as keys minus head_dim); negative pos un-rotates."""
    if pos.dim() == 3 and bool((pos == pos[:1, :1]).all()):
        # every layer and head at the same positions (a full cache): one [N, d] table broadcast, not L*H copies,
        # which at 7k tokens were 340 MB of cos/sin and most of a CacheBlend answer's load time
        pos = pos[:1, :1]
    cos, sin = _rotation(lm, pos)
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


# --------------------------------------------------------------- capture
def layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh DynamicCache holding these per-layer (keys, values) [1, H, n, d]; inputs are not modified."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def prefill(lm, ids: list[int], cache: DynamicCache, start: int) -> torch.Tensor:
    """Run every layer over `ids` at positions start.., causal over what the cache holds; returns last hidden."""
    h = embed(lm, torch.tensor([ids], device=lm.device))
    past = cache.get_seq_length()
    mask = causal_mask(len(ids), past + len(ids), lm.device) if len(ids) > 1 else None
    return run_layers(lm, h, 0, lm.n_layers, positions(start, len(ids), lm.device), mask, cache)


def prefix_layers(lm, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = DynamicCache()
    with torch.inference_mode():
        prefill(lm, prefix_ids, cache, 0)
    return layer_kv(cache)


def capture(lm, prefix: list[tuple[torch.Tensor, torch.Tensor]], passage_ids: list[int],
            cue: list[int] | None = None) -> tuple[PassageKV, torch.Tensor | None]:
    """One passage's full cache computed alone behind the prefix's per-layer KV, keys made position-free: the
    shared preparation pass (engine/prepare_pass.py) over a batch of one.

    With `cue` (e.g. RECONSTRUCT_CUE's ids), also returns KVzip-style importance [L, H_kv, n]: the most attention
    any token of [cue, passage again] pays to each passage token, max over the query heads sharing the KV head.
    Tokens the model needs to reproduce the passage score high."""
    from .prefix import PrefixState
    from .prepare_pass import Needs, forward_chunks

    state = PrefixState([], prefix, None) if prefix else None  # ids unused: the layers say how long it is
    (out,) = forward_chunks(lm, state, [list(passage_ids)], Needs(kv=True, reconstruct=cue is not None), cue)
    return out.kv, out.scores


# ----------------------------------------------------------- compression
def keynorm_scores(kv: PassageKV) -> torch.Tensor:
    """kvpress Knorm: keys with a *small* norm tend to draw the most attention, so they are kept."""
    return -kv.keys.float().norm(dim=-1)


def kept_count(n_tokens: int, ratio: int) -> int:
    return max(1, math.ceil(n_tokens / ratio))


def compress(kv: PassageKV, scores: torch.Tensor, ratio: int) -> PassageKV:
    """Keep the top 1/ratio tokens per layer and KV head, in their original order."""
    keep = kept_count(kv.n_tokens, ratio)
    if keep >= kv.kept:
        return kv
    index = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    gather = index.unsqueeze(-1).expand(*index.shape, kv.keys.shape[-1])
    return PassageKV(kv.keys.gather(2, gather), kv.values.gather(2, gather), kv.offsets.gather(2, index), kv.n_tokens)


def kept_share(kv: PassageKV) -> torch.Tensor:
    """Per passage token, the share of (layer x KV head) slots that kept it, from the kept indices `compress`
    chose: 1 = kept everywhere, 0 = dropped everywhere. Its mean is kept / n_tokens (about 1/ratio)."""
    slots = kv.offsets.shape[0] * kv.offsets.shape[1]
    return torch.bincount(kv.offsets.reshape(-1).long().cpu(), minlength=kv.n_tokens).float() / slots


# --------------------------------------------------------- serialisation
# how each stored dtype quantises keys and values: (bits, the axis one fp16 scale covers: "token" = a scale per
# token and head over head_dim; "channel" = a scale per channel and head over the passage's kept tokens)
QUANTISATION = {"int8": {"keys": (8, "token"), "values": (8, "token")},
                "k8v4": {"keys": (8, "token"), "values": (4, "token")},
                "int4": {"keys": (4, "token"), "values": (4, "token")}}


def _quantize(x: torch.Tensor, bits: int, per: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer grid, one fp16 scale per token (over head_dim) or per channel (over tokens); the values
    are quantised with the rounded scale they will be decoded with. 4 bits pack two values per byte."""
    x = x.float()
    top = 2 ** (bits - 1) - 1
    axis = -1 if per == "token" else -2
    scale = (x.abs().amax(dim=axis, keepdim=True).clamp_min(1e-6) / top).to(torch.float16)
    q = torch.round(x / scale.float()).clamp(-top, top).to(torch.int8)
    if bits == 4:
        unsigned = (q + 8).to(torch.uint8)
        q = (unsigned[..., 0::2] << 4) | unsigned[..., 1::2]
    return q.cpu().numpy(), scale.cpu().numpy()


def _dequantize(q: np.ndarray, scale: np.ndarray, bits: int) -> torch.Tensor:
    x = torch.from_numpy(q)
    if bits == 4:
        x = torch.stack([(x >> 4).to(torch.int8) - 8, (x & 15).to(torch.int8) - 8], dim=-1).flatten(-2)
    return x.float() * torch.from_numpy(scale).float()


def to_bytes(kv: PassageKV, storage: str = "fp16") -> bytes:
    """safetensors bytes (no pickle): keys, values, and the kept tokens' offsets (one byte each for passages up
    to 256 tokens; left out when every token is kept, as in a full cache); int8/int4 add fp16 scales
    (`QUANTISATION`)."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {STORAGE_DTYPES}")
    tensors = {}
    if not _dense(kv):
        tensors["offsets"] = kv.offsets.to(torch.uint8 if kv.n_tokens <= 256 else torch.int16).cpu().numpy()
    if storage == "fp16":
        tensors["keys"] = kv.keys.to(torch.float16).cpu().numpy()
        tensors["values"] = kv.values.to(torch.float16).cpu().numpy()
    else:
        how = QUANTISATION[storage]
        tensors["keys"], tensors["key_scale"] = _quantize(kv.keys, *how["keys"])
        tensors["values"], tensors["value_scale"] = _quantize(kv.values, *how["values"])
    return save_numpy(tensors, metadata={"n_tokens": str(kv.n_tokens), "storage": storage})


def _dense(kv: PassageKV) -> bool:
    """Every token kept, in order: the offsets say nothing a reader cannot rebuild."""
    if kv.kept != kv.n_tokens:
        return False
    return bool((kv.offsets == torch.arange(kv.n_tokens, device=kv.offsets.device)).all())


def from_bytes(blob: bytes, dtype: torch.dtype, device) -> PassageKV:
    tensors = load_numpy(blob)
    meta = safetensors_metadata(blob)
    n_tokens = int(meta["n_tokens"])
    how = QUANTISATION.get(meta.get("storage"), {})

    def tensor(name: str) -> torch.Tensor:
        scale = tensors.get(f"{name[:-1]}_scale")  # keys -> key_scale, values -> value_scale
        bits = how.get(name, (8,))[0]
        x = torch.from_numpy(tensors[name]).float() if scale is None else _dequantize(tensors[name], scale, bits)
        return x.to(device=device, dtype=dtype)

    keys = tensor("keys")
    if "offsets" in tensors:
        offsets = torch.from_numpy(tensors["offsets"]).long().to(device)
    else:
        offsets = torch.arange(n_tokens, device=device).expand(*keys.shape[:2], n_tokens).clone()
    return PassageKV(keys, tensor("values"), offsets, n_tokens)


# -------------------------------------------------------------- assembly
def placed_layers(lm, prefix: list[tuple[torch.Tensor, torch.Tensor]], passages: list[PassageKV],
                  starts: list[int], reserve: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values): the prefix, then each passage's kept tokens rotated to start + offset, then
    `reserve` zero slots for tokens a caller writes in place later. Every layer at once: one rotation and one
    concatenation for the whole cache (per passage and layer it would be ~300 small ops, 4 ms of an answer); each
    layer's pair is a view into that one block."""
    prefix_keys = torch.cat([k for k, _ in prefix])  # [L, H, P, d]
    prefix_values = torch.cat([v for _, v in prefix])
    keys, values = [prefix_keys], [prefix_values]
    if passages:
        keys.append(rotate_keys(lm, torch.cat([p.keys for p in passages], dim=2),
                                torch.cat([p.offsets + s for p, s in zip(passages, starts)], dim=2)))
        values.append(torch.cat([p.values for p in passages], dim=2))
    room = [prefix_keys.new_zeros(*prefix_keys.shape[:2], reserve, prefix_keys.shape[3])] if reserve else []
    all_keys = torch.cat([k.to(prefix_keys.dtype) for k in keys] + room, dim=2)
    all_values = torch.cat([v.to(prefix_values.dtype) for v in values] + room, dim=2)
    return [(all_keys[i:i + 1], all_values[i:i + 1]) for i in range(len(prefix))]
