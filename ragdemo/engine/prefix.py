"""Automatic prefix caching, as serving engines do it: the shared instruction prefix's KV is computed once per
model and every method's prefill starts after it.

Every prompt starts with one of a few fixed instruction prefixes (engine/prompt.py `shared_prefixes`: the
system turn + "Context:" for retrieval prompts, the bare system turn for closed book and JRT). Entries are
keyed by the exact prefix token ids and by the adapter switched on (a LoRA changes the prefix's states too);
the cache belongs to the LM object (`lm.prefix_cache`) and is emptied when the model object changes. An answer
that reads the prefix from here counts it in `cached_tokens`, not `processed_tokens`, whatever the method.

`shared_prefix(lm, ids)` is the cached `PrefixState` (cacheblend, lingua, lloco); `compute_prefix` the same
computed now for a prefix that is not shared (e.g. one that holds the question).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .kv import cache_from, layer_kv
from ..caching import kept_while
from .memo import BoundedCache, lm_owned
from .prompt import shared_prefixes

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PrefixState:
    """A prefix read by every layer: its ids, per-layer (keys, values), the logits at its last position (what
    predicts the first token after it), and `fresh`: computed for this call rather than read from the cache."""

    ids: list[int]
    layers: Layers
    last_logits: torch.Tensor  # [1, 1, vocab]
    fresh: bool = True

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.last_logits.nbytes + sum(k.nbytes + v.nbytes for k, v in self.layers)


def compute_prefix(lm, ids: list[int]) -> PrefixState:
    cache = DynamicCache()
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device), past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits
    return PrefixState(list(ids), layer_kv(cache), logits, fresh=True)


class PrefixCache:
    """Per-layer (keys, values) of instruction prefixes, least recently used first out, bounded in bytes: one
    entry per (prefix, adapter), so a count bound would evict every LoRA's prefix as soon as a comparison runs
    more adapters than it (each answer would then recompute its prefix, and its TTFT would depend on the order
    the methods ran in)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.items = BoundedCache(max_bytes, lambda state: state.nbytes)
        # per tokenizer (stamped with its id): "prefixes", the shared prefixes longest first, and "instruction",
        # the retrieval prompts' prefix ids
        self.tokenized: dict[str, tuple[int, list]] = {}

    def _key(self, lm, ids: list[int]) -> tuple:
        if self.items.keep_for(id(lm.model)):
            self.tokenized.clear()
        adapters = getattr(lm, "adapters", None)
        return tuple(ids), getattr(adapters, "active", None)

    def has(self, lm, ids: list[int]) -> bool:
        return self._key(lm, ids) in self.items

    def get(self, lm, ids: list[int]) -> PrefixState:
        """The prefix's state: from the cache (`fresh` False) or computed now and kept. Callers must not modify
        the tensors (`kv.cache_from` copies them into a fresh cache)."""
        key = self._key(lm, ids)
        if key in self.items:
            state = self.items.get(key, None)
            return PrefixState(state.ids, state.layers, state.last_logits, fresh=False)
        return self.items.get(key, lambda: compute_prefix(lm, ids))

    def shared_prefix(self, lm, ids: list[int]) -> list[int]:
        """The longest shared instruction prefix that `ids` starts with (and leaves at least one token after)."""
        self._key(lm, [])
        prefixes = kept_while(self.tokenized, "prefixes", id(lm.tokenizer),
                              lambda: sorted(shared_prefixes(lm.tokenizer), key=len, reverse=True))
        for prefix in prefixes:
            if len(prefix) < len(ids) and ids[:len(prefix)] == prefix:
                return prefix
        return []

    def instruction_ids(self, lm) -> list[int]:
        """`instruction_prefix_ids` of the LM's tokenizer, tokenized once (answers ask for it several times)."""
        self._key(lm, [])
        return list(kept_while(self.tokenized, "instruction", id(lm.tokenizer),
                               lambda: instruction_prefix_ids(lm.tokenizer)))

    def start(self, lm, ids: list[int]) -> tuple[DynamicCache, int, bool]:
        """A fresh cache already holding the shared prefix of `ids`, how many tokens it holds, and whether they
        were read from the cache (False: computed now, so they count as processed)."""
        prefix = self.shared_prefix(lm, ids)
        if not prefix:
            return DynamicCache(), 0, False
        state = self.get(lm, prefix)
        return cache_from(state.layers), len(prefix), not state.fresh


def prefix_cache(lm) -> PrefixCache:
    """The LM's prefix cache, made on first use; it lives and dies with the LM object."""
    return lm_owned(lm, "prefix_cache", PrefixCache)


def instruction_prefix_ids(tokenizer) -> list[int]:
    """The prefix every retrieving prompt starts with (rag's layout up to the first passage); it does not depend
    on the question, so passages can be processed behind it offline."""
    from .prompt import build_prompt

    return build_prompt(tokenizer, "?", [{"text": "."}]).segments[0].ids


def instruction_ids(lm) -> list[int]:
    """The retrieval prompts' instruction prefix for this LM, from its prefix cache's memo."""
    return prefix_cache(lm).instruction_ids(lm)


def shared_prefix(lm, ids: list[int]) -> PrefixState:
    """The instruction prefix `ids` from the LM's prefix cache (computed on first use)."""
    return prefix_cache(lm).get(lm, ids)
