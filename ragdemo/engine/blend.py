"""CacheBlend-style selective recompute (Yao et al., EuroSys 2025) over an assembled, reused passage cache.

Passages whose KV was computed alone never attended to each other. Recomputing every passage token would be a
full prefill; CacheBlend recomputes only the tokens whose reused KV deviates most from what a full prefill
gives ("high-KV-deviation" tokens) and lets them carry the cross-passage attention into the later layers:

- layers below the selection layer run for every passage token (the first layers are cheap and their inputs,
  the embeddings, are exact, so their KV is exact);
- at the selection layer every passage token's real KV is compared with the reused KV; the tokens that deviate
  most go on (with `gradual`, twice as many go on and the next layer narrows them, as the paper's gradual
  filtering does);
- every later layer runs only for the selected tokens: their queries attend to the mixed cache, and their new
  KV replaces the reused entries. Everything that is computed is written back; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import embed, run_layers


@dataclass
class Blend:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # the cache after recompute (same tensors, updated in place)
    recomputed: list[int]  # passage-token indices recomputed through the last layer, ascending
    token_layers: int  # (token, layer) pairs computed: the cost in units of one token through one layer


class _MixedCache:
    """Duck-types the one call a decoder layer makes on its cache (`update`): the layer's fresh KV for the
    tokens now running overwrites their reused slots, and the whole mixed cache is what attention reads.
    At a selection layer it first ranks those tokens by how far their reused KV is from the fresh one."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers
        self.slots = torch.zeros(0, dtype=torch.long)
        self.select: int | None = None
        self.chosen: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        cached_k, cached_v = self.layers[layer_idx]
        if self.select is not None:
            self.chosen = top_deviation(cached_k[0, :, self.slots], cached_v[0, :, self.slots], keys[0], values[0],
                                        self.select)
        cached_k[0, :, self.slots] = keys[0].to(cached_k.dtype)
        cached_v[0, :, self.slots] = values[0].to(cached_v.dtype)
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
                        keep: int, selection_layer: int = 1, gradual: bool = False) -> Blend:
    """Recompute `keep` passage tokens through the upper layers, chosen by KV deviation at `selection_layer`.

    `layers` hold per layer (keys, values) [1, H, T, d] with the passage tokens at cache slots (= positions)
    start .. start + len(passage_ids) - 1 and nothing after them; they are updated in place.
    keep = len(passage_ids) recomputes everything: the result is the full prefill's cache."""
    n, n_layers = len(passage_ids), lm.n_layers
    selection_layer = max(0, min(selection_layer, n_layers - 1))
    gradual = gradual and selection_layer + 1 < n_layers  # narrowing needs a layer after the selection
    cache = _MixedCache(layers)
    total = cache.get_seq_length()
    slots = torch.arange(start, start + n, device=lm.device)
    hidden = embed(lm, torch.tensor([passage_ids], device=lm.device))
    token_layers = 0
    for layer in range(n_layers):
        if keep <= 0 or slots.numel() == 0:
            break
        cache.slots, cache.chosen = slots, None
        cache.select = _selection_size(layer, selection_layer, keep, n, gradual)
        allowed = slots.unsqueeze(1) >= torch.arange(total, device=lm.device).unsqueeze(0)  # causal by position
        hidden = run_layers(lm, hidden, layer, layer + 1, slots.unsqueeze(0), allowed[None, None], cache)
        token_layers += int(slots.numel())
        if cache.chosen is not None:
            hidden, slots = hidden[:, cache.chosen], slots[cache.chosen]
    recomputed = (slots - start).tolist() if keep > 0 else []
    return Blend(layers, recomputed, token_layers)


def _selection_size(layer: int, selection_layer: int, keep: int, n: int, gradual: bool) -> int | None:
    """How many tokens go on after this layer (None: all that ran)."""
    if layer == selection_layer:
        return min(n, 2 * keep) if gradual else min(n, keep)
    if gradual and layer == selection_layer + 1:
        return min(n, keep)
    return None
