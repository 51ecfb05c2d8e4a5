"""CacheBlend-style selective recompute (Yao et al., EuroSys 2025) over an assembled, reused passage cache.

Passages whose KV was computed alone never attended to each other. Recomputing every passage token would be a
full prefill; CacheBlend recomputes only the tokens whose reused KV deviates most from what a full prefill
gives ("high-KV-deviation" tokens) and lets them carry the cross-passage attention into the later layers:

- layers below the selection layer run for every passage token (the first layers are cheap and their inputs,
  the embeddings, are exact, so their KV is exact);
- at the selection layer only every passage token's keys and values are projected (what the comparison needs,
  about a sixth of a layer) and compared with the reused KV; the fresh KV of every token is written back, and
  the tokens that deviate most go on through the rest of that layer (with `gradual`, twice as many go on and
  the next layer narrows them, as the paper's gradual filtering does);
- every later layer runs only for the selected tokens: their queries attend to the mixed cache, and their new
  KV replaces the reused entries. Everything that is computed is written back; nothing else changes.
- the question (`suffix_ids`) runs in the same pass, always selected (CacheBlend blends inside the one prefill
  that also computes the query), so every layer's weights are read once for both. Prefilling it afterwards
  instead gives the same result, since no passage token attends to it; it only reads the weights twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import embed, project_kv, run_layers


@dataclass
class Blend:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # the cache after recompute (same tensors, updated in place)
    recomputed: list[int]  # passage-token indices recomputed through the last layer, ascending
    token_layers: int  # (token, layer) pairs whose KV was computed (projection only for unselected tokens at a
    #                    selection layer, counted as one: an upper bound), the cost in units of one token-layer
    suffix_hidden: torch.Tensor | None  # [1, s, D] last layer's output for the suffix tokens (before the norm)
    passage_layers: list[int]  # per passage token, the layers whose KV was computed now (the rest was reused)
    selection_overhead: int = 0  # KV projections at a selection layer that the chosen tokens then recompute whole:
    #                              work spent on choosing, not part of the prompt (token-layers)


class _MixedCache:
    """Duck-types the one call a decoder layer makes on its cache (`update`): the layer's fresh KV for the
    tokens now running overwrites their slots, and the whole mixed cache is what attention reads."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers
        self.slots = torch.zeros(0, dtype=torch.long)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.write(layer_idx, self.slots, keys, values)

    def write(self, layer_idx: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        cached_k, cached_v = self.layers[layer_idx]
        cached_k[0, :, slots] = keys[0].to(cached_k.dtype)
        cached_v[0, :, slots] = values[0].to(cached_v.dtype)
        return cached_k, cached_v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx][0].shape[2])


def kv_deviation(old_k, old_v, new_k, new_v) -> torch.Tensor:
    """Per token, squared L2 distance between reused and fresh keys plus values, summed over KV heads.
    Inputs [H, q, d] -> [q]."""
    return ((new_k.float() - old_k.float()) ** 2).sum(dim=(0, 2)) + ((new_v.float() - old_v.float()) ** 2).sum(dim=(0, 2))


def top_deviation(old_k, old_v, new_k, new_v, count: int) -> torch.Tensor:
    """Indices (ascending) of the `count` tokens whose reused KV deviates most."""
    deviation = kv_deviation(old_k, old_v, new_k, new_v)
    count = min(count, deviation.numel())
    return deviation.topk(count).indices.sort().values


def selective_recompute(lm, layers: list[tuple[torch.Tensor, torch.Tensor]], passage_ids: list[int], start: int,
                        keep: int, selection_layer: int = 1, gradual: bool = False,
                        suffix_ids: list[int] = ()) -> Blend:
    """Recompute `keep` passage tokens through the upper layers, chosen by KV deviation at `selection_layer`,
    and run `suffix_ids` (the question) after them through every layer in the same pass.

    `layers` hold per layer (keys, values) [1, H, T, d] with the passage tokens at cache slots (= positions)
    start .. start + len(passage_ids) - 1, then room for the suffix; they are updated in place.
    keep = len(passage_ids) recomputes everything: the result is the full prefill's cache."""
    n, n_layers, suffix = len(passage_ids), lm.n_layers, list(suffix_ids)
    selection_layer = max(0, min(selection_layer, n_layers - 1))
    cache = _MixedCache(layers)
    total = cache.get_seq_length()
    if total < start + n + len(suffix):  # placed_layers reserves the room: a mismatch is a bug, said plainly
        raise ValueError(f"the blended cache holds {total} slots, fewer than the {start + n + len(suffix)} it needs")
    keep = max(0, min(keep, n))
    running = n if keep > 0 else 0  # passage rows in the batch; they come first, the suffix rows after them
    slots = torch.arange(start + n - running, start + n + len(suffix), device=lm.device)
    ids = passage_ids[n - running:] + suffix
    hidden = embed(lm, torch.tensor([ids], device=lm.device)) if ids else None
    computed = torch.zeros(n, dtype=torch.long, device=lm.device)  # per passage token, layers computed now
    layer, overhead = 0, 0
    for at, count in _selections(selection_layer, keep, n, gradual, n_layers) if running else []:
        hidden = _run(lm, hidden, layer, at, slots, cache, total)
        computed[slots[:running] - start] += at - layer
        chosen = _select(lm, cache, at, hidden[:, :running], slots[:running], count)
        computed[slots[:running] - start] += 1  # every row's KV was projected at this layer...
        computed[slots[chosen] - start] -= 1  # ...the chosen ones' layer is counted when it runs whole, below
        overhead += int(chosen.numel())  # so their projection here was only for choosing
        rows = torch.cat([chosen, torch.arange(running, slots.numel(), device=lm.device)])
        hidden, slots, running, layer = hidden[:, rows], slots[rows], count, at
    if hidden is not None:
        hidden = _run(lm, hidden, layer, n_layers, slots, cache, total)
        computed[slots[:running] - start] += n_layers - layer
    recomputed = (slots[:running] - start).tolist()
    token_layers = int(computed.sum()) + len(suffix) * n_layers
    return Blend(layers, recomputed, token_layers, hidden[:, running:] if suffix else None, computed.tolist(), overhead)


def _run(lm, hidden, begin: int, end: int, slots: torch.Tensor, cache: _MixedCache, total: int):
    """Layers [begin, end) for the rows at `slots`, causal by position over the whole mixed cache."""
    if begin >= end:
        return hidden
    cache.slots = slots
    allowed = slots.unsqueeze(1) >= torch.arange(total, device=slots.device).unsqueeze(0)
    return run_layers(lm, hidden, begin, end, slots.unsqueeze(0), allowed[None, None], cache)


def _select(lm, cache: _MixedCache, layer: int, hidden, slots: torch.Tensor, count: int) -> torch.Tensor:
    """Project these passage rows' KV at `layer`, write it back, return the rows (ascending) that deviate most."""
    rope = lm.model.model.rotary_emb(hidden, position_ids=slots.unsqueeze(0))
    keys, values = project_kv(lm, layer, hidden, rope)
    cached_k, cached_v = cache.layers[layer]
    chosen = top_deviation(cached_k[0, :, slots], cached_v[0, :, slots], keys[0], values[0], count)
    cache.write(layer, slots, keys, values)
    return chosen


def _selections(selection_layer: int, keep: int, n: int, gradual: bool, n_layers: int) -> list[tuple[int, int]]:
    """(layer, rows that go on through it) for each narrowing step; none when every token is recomputed."""
    if keep >= n:
        return []
    if gradual and selection_layer + 1 < n_layers:  # narrowing needs a layer after the selection
        return [(selection_layer, 2 * keep), (selection_layer + 1, keep)] if 2 * keep < n else [(selection_layer + 1, keep)]
    return [(selection_layer, keep)]
