"""Warm-up: pay every one-time cost (thread pools, kernel selection, lazy allocation, prefix caches) before
the first timed answer, so no method's TTFT depends on whether it happened to run first."""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from .generate import generate, supports_kv_cache
from .layers import forward_all
from .prefix import prefix_cache
from .prompt import build_prompt, shared_prefixes

# Two lengths: kernels are picked per shape class, and answers range from a question alone to several passages.
_WARM_PASSAGE_WORDS = (8, 48)


def warm_model(lm) -> float:
    """A short prefill plus decode steps through the HF path and, where the model allows, the engine's own
    layer-range path (BTR, LLoCO and RETRO decode through it). Returns the seconds it took."""
    started = time.perf_counter()
    for words in _WARM_PASSAGE_WORDS:
        prompt = build_prompt(lm.tokenizer, "What is warm?", [{"text": "warm " * words}])
        generate(lm, prompt.ids, 2, time.perf_counter())
        if lm.is_llama_like:
            with torch.inference_mode():
                cache = DynamicCache()
                forward_all(lm, torch.tensor([prompt.ids], device=lm.device), cache, 0)
                forward_all(lm, torch.tensor([[prompt.ids[-1]]], device=lm.device), cache, len(prompt.ids))
    if supports_kv_cache(lm):  # every shared instruction prefix, so no method computes one inside its answer
        for ids in shared_prefixes(lm.tokenizer):
            prefix_cache(lm).get(lm, ids)
    return time.perf_counter() - started
