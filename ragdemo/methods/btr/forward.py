"""BTR's query-time forward over stored passage states: the query side through the lower layers, then the upper
layers over [prefix, lead, passages, question] with optional runtime merging, and the step that decodes after it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ...engine.kv import cache_from
from ...engine.layers import CAUSAL, embed, logits, positions, run_layers
from ...engine.merging import bipartite_merge, merge_within_groups, sized
from ...engine.prefix import shared_prefix
from ...engine.prepare_pass import Needs, forward_chunks

ONCE, EVERY = "once", "every"  # runtime merging: one fold at merge_layer, or a ToMe step before every layer from it


@dataclass
class Forward:
    """What a BTR prefill produced: logits for the wanted positions, the per-layer cache, and counts."""

    logits: torch.Tensor
    cache: DynamicCache
    next_pos: int
    token_layers: float  # token x layer products computed at query time
    removed: int  # passage tokens merged away by the last layer
    merge_at: int = 0  # the layer where runtime merging started
    removed_at_split: int = 0  # passage tokens already gone when the first upper layer ran (its window is widest)
    key_bias: dict = dataclasses.field(default_factory=dict)  # {layer: log sizes of its cached keys}, for decoding
    hidden: torch.Tensor | None = None  # last layer's output over [lead, passages (merged), question], pre-norm
    passage_layers: list[int] = dataclasses.field(default_factory=list)  # per passage, token x layer products
    #                                                 computed in the upper layers (fewer where merging folded tokens)


def lower_states(lm, prefix_ids: list[int], ids: list[int], split: int) -> torch.Tensor:
    """A passage's layer-`split` states, computed with only the instruction prefix before it (or nothing): the
    shared preparation pass over one chunk."""
    prefix = shared_prefix(lm, prefix_ids) if prefix_ids else None
    (out,) = forward_chunks(lm, prefix, [list(ids)], Needs(states_at=frozenset({split})))
    return out.states[split]


def btr_forward(lm, prefix_ids: list[int], passages: list[torch.Tensor], question_ids: list[int], split: int,
                want: int = 1, r_p: float = 0.0, merge_layer: int | None = None, prefix=None,
                lead_ids: list[int] | None = None, merge_mode: str = ONCE) -> Forward:
    """Prefill [prefix, lead, passages, question] where passages arrive as layer-`split` states.

    `lead_ids` (query-aware layout: a copy of the question before the passages) is empty by default.
    The prefix comes first and sees only itself, so its keys and values in every layer are those of the prefix
    read alone: `prefix` passes them in (from the LM's prefix cache), otherwise they are computed here.
    Layers [0, split): the query side alone (lead, then question, after the prefix, at their final positions so
    RoPE distances match). Layers [split, L): lead, passages and question jointly under one causal mask, so
    passages attend to the lead; runtime merging of passage tokens from `merge_layer` on. The cache then holds
    only query-side keys below the split and all keys above it, which is exactly what generated tokens may attend
    to. Returns logits of the last `want` positions.
    """
    n_layers = lm.n_layers
    device, dtype = lm.device, lm.model.dtype
    lead = list(lead_ids or [])
    p, a, q = len(prefix_ids), len(lead), len(question_ids)
    n = sum(len(s) for s in passages)
    cache = cache_from(prefix) if prefix is not None else DynamicCache()
    computed = 0 if prefix is not None or p == 0 else p
    if computed:
        run_layers(lm, embed(lm, torch.tensor([prefix_ids], device=device)), 0, n_layers, positions(0, p, device),
                   CAUSAL, cache)
    lower = _lower_query(lm, [(lead, p), (list(question_ids), p + a + n)], split, cache)
    h = torch.cat([lower[:, :a]] + [s.to(device, dtype).unsqueeze(0) for s in passages] + [lower[:, a:]], dim=1)
    pos = positions(p, a + n + q, device)
    merge_at = split if merge_layer is None or merge_layer < 0 else max(split, min(merge_layer, n_layers))
    h = run_layers(lm, h, split, merge_at, pos, CAUSAL, cache)
    upper = _merge_every(lm, h, pos, passages, a, merge_at, r_p, cache) if merge_mode == EVERY \
        else _merge_once(lm, h, pos, a, [len(s) for s in passages], merge_at, r_p, cache)
    per_passage = [len(s) * (merge_at - split) + merged for s, merged in zip(passages, upper.passage_layers)]
    token_layers = (computed + a + q) * n_layers + sum(per_passage)
    removed_at_split = upper.removed_first if merge_at == split else 0
    return Forward(logits(lm, upper.hidden[:, -want:]), cache, p + a + n + q, token_layers, upper.removed, merge_at,
                   removed_at_split, upper.key_bias, upper.hidden, per_passage)


def _lower_query(lm, pieces: list[tuple[list[int], int]], split: int, cache) -> torch.Tensor:
    """Query-side pieces (ids, first position) through layers [0, split), each at its final positions, causal in
    order after what the cache holds (the question sees the lead, as if run after it). One call for all pieces:
    a short prefill costs mostly the reading of each layer's weights, so two calls would read them twice."""
    ids = [i for piece, _ in pieces for i in piece]
    pos = torch.cat([positions(start, len(piece), lm.device) for piece, start in pieces], dim=1)
    return run_layers(lm, embed(lm, torch.tensor([ids], device=lm.device)), 0, split, pos, CAUSAL, cache)


@dataclass
class _Upper:
    """Layers [merge_at, L) run: final states, passage token x layer products, tokens removed (in all and by the
    first merge), and the proportional-attention key bias per layer."""

    hidden: torch.Tensor
    passage_layers: list[int]  # per passage, its token x layer products in layers [merge_at, L)
    removed: int
    removed_first: int
    key_bias: dict


def _merge_once(lm, h, pos, a: int, lengths: list[int], merge_at: int, r_p: float, cache) -> _Upper:
    """merge_mode=once: one bipartite fold over all passage tokens at `merge_at`, plain attention."""
    n = sum(lengths)
    merged = bipartite_merge(h, pos, torch.arange(a, a + n, device=h.device), r_p)
    hidden = run_layers(lm, merged.hidden, merge_at, lm.n_layers, merged.pos, CAUSAL, cache)
    ends = torch.tensor(lengths, device=h.device).cumsum(0) + a
    owner = torch.bucketize(merged.keep, ends, right=True)  # which passage each surviving row belongs to
    in_passages = (merged.keep >= a) & (merged.keep < a + n)
    kept = torch.bincount(owner[in_passages], minlength=len(lengths)).tolist()
    return _Upper(hidden, [k * (lm.n_layers - merge_at) for k in kept], merged.removed, merged.removed, {})


def _merge_every(lm, h, pos, passages, a: int, merge_at: int, r_p: float, cache) -> _Upper:
    """ToMe in every layer from `merge_at`: before each layer, fold r_p of each passage's remaining tokens within
    that passage, then run the layer with log(size) added to the merged keys' logits (proportional attention)."""
    lengths = torch.tensor([len(s) for s in passages], device=h.device)
    group = torch.cat([torch.full((a,), -1, device=h.device),
                       torch.repeat_interleave(torch.arange(len(passages), device=h.device), lengths),
                       torch.full((h.shape[1] - a - int(lengths.sum()),), -1, device=h.device)]).long()
    tokens = sized(h, pos, group)
    removed, first, key_bias = 0, 0, {}
    passage_layers = torch.zeros(len(passages), dtype=torch.long, device=h.device)
    for layer in range(merge_at, lm.n_layers):
        tokens, folded = merge_within_groups(tokens, r_p)
        removed += folded
        first = folded if layer == merge_at else first
        passage_layers += torch.bincount(tokens.group[tokens.group >= 0], minlength=len(passages))
        bias = None
        if removed:
            bias = {layer: torch.cat([torch.zeros(cache.get_seq_length(layer), device=h.device), tokens.log_size()])}
            key_bias.update(bias)
        hidden = run_layers(lm, tokens.hidden, layer, layer + 1, tokens.pos, CAUSAL, cache, bias)
        tokens = dataclasses.replace(tokens, hidden=hidden)
    return _Upper(tokens.hidden, passage_layers.tolist(), removed, first, key_bias)


def decode_step(lm, key_bias: dict | None = None):
    """One generated token: every layer in one pass; a single query with no mask attends to each layer's
    whole cache, which below the split is query-side only. `key_bias` keeps merged keys weighted by their size."""
    def step(ids, pos, cache):
        h = run_layers(lm, embed(lm, ids), 0, lm.n_layers, positions(pos, 1, lm.device), None, cache, key_bias)
        return logits(lm, h)
    return step

