"""Decoding: prefill, then a greedy or sampled loop over a per-layer cache, streaming each token."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .layers import forward_all
from .prefix import prefix_cache

Stream = Callable[[str], None]


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Generation:
    ids: list[int]
    text: str
    ttft_s: float  # from t0 (question received) to the first answer token
    decode_s: float  # after the first token until the last
    cached_tokens: int = 0  # prompt tokens whose states came from the shared prefix cache (not computed now)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    last = logits[0, -1].float()
    if sampling.temperature <= 0:
        return int(last.argmax())
    last = last.cpu()  # the seeded generator lives on the CPU, so a seed gives the same draw on any device
    probs = torch.softmax(last / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class TimedStream:
    """A stream callback with a deadline. The decode loops stop at it, so one visitor's Compare cannot hold the
    shared model queue past the app's limit; `cut` then says the answer was stopped early."""

    def __init__(self, callback: Stream | None, deadline: float):
        self.callback, self.deadline, self.cut = callback, deadline, False

    def __call__(self, text: str) -> None:
        if self.callback:
            self.callback(text)

    def expired(self) -> bool:
        if time.perf_counter() >= self.deadline:
            self.cut = True
        return self.cut


def _expired(stream) -> bool:
    check = getattr(stream, "expired", None)
    return bool(check and check())


class _TextStream:
    """Turns token ids into text deltas; decoding the whole tail keeps multi-byte characters intact."""

    def __init__(self, tokenizer, callback: Stream | None):
        self.tokenizer, self.callback, self.ids, self.text = tokenizer, callback, [], ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.callback and len(text) > len(self.text) and not text.endswith("\ufffd"):
            self.callback(text[len(self.text):])
            self.text = text
        elif not text.endswith("\ufffd"):
            self.text = text


def decode_loop(lm, cache, first_logits: torch.Tensor, next_pos: int, max_new_tokens: int, t0: float,
                stream: Stream | None = None, sampling: Sampling | None = None,
                step: Callable | None = None) -> Generation:
    """Generate from logits already computed over the prompt.

    `step(ids, pos, cache) -> logits` runs one token; the default is the full model, but BTR and RETRO swap in
    their own. A single decode token needs no mask, so caches whose layers differ in length work too.
    """
    sampling = sampling or Sampling()
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    step = step or (lambda ids, pos, c: forward_all(lm, ids, c, pos))
    out = _TextStream(lm.tokenizer, stream)
    eos = lm.eos_ids
    logits, ttft, first_at = first_logits, 0.0, time.perf_counter()
    for i in range(max_new_tokens):
        token = next_token(logits, sampling, generator)
        if i == 0:
            first_at = time.perf_counter()
            ttft = first_at - t0
        if token in eos:
            break
        out.push(token)
        if i + 1 == max_new_tokens or _expired(stream):
            break
        with torch.inference_mode():
            logits = step(torch.tensor([[token]], device=lm.device), next_pos, cache)
        next_pos += 1
    return Generation(out.ids, out.text.strip(), ttft, time.perf_counter() - first_at)


def supports_kv_cache(lm) -> bool:
    return "past_key_values" in inspect.signature(lm.model.forward).parameters


def generate(lm, ids: list[int], max_new_tokens: int, t0: float, stream: Stream | None = None,
             sampling: Sampling | None = None) -> Generation:
    """Prefill `ids` and decode. Recurrent models (Mamba, RWKV) keep their own state: they go through HF generate."""
    if not supports_kv_cache(lm):
        return _generate_recurrent(lm, ids, max_new_tokens, t0, stream, sampling or Sampling())
    cache, start, hit = prefix_cache(lm).start(lm, ids)  # the shared instruction prefix is read, not recomputed
    input_ids = torch.tensor([ids[start:]], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    generation = decode_loop(lm, cache, logits, len(ids), max_new_tokens, t0, stream, sampling,
                             step=lambda tok, pos, c: lm.model(input_ids=tok, past_key_values=c, use_cache=True).logits)
    generation.cached_tokens = start if hit else 0
    return generation


def _generate_recurrent(lm, ids, max_new_tokens, t0, stream, sampling) -> Generation:
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    out = _TextStream(lm.tokenizer, stream)
    times: list[float] = []
    eos = lm.eos_ids

    class Collector(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first echoes the prompt
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                times.append(time.perf_counter())
                if token not in eos:
                    out.push(token)

        def end(self):
            pass

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), _expired(stream), dtype=torch.bool, device=input_ids.device)

    kwargs = dict(max_new_tokens=max_new_tokens, streamer=Collector(), pad_token_id=lm.tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([Deadline()]))
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False)
    with torch.inference_mode():
        lm.model.generate(torch.tensor([ids], device=lm.device), **kwargs)
    ttft = (times[0] - t0) if times else time.perf_counter() - t0
    decode = (times[-1] - times[0]) if times else 0.0
    return Generation(out.ids, out.text.strip(), ttft, decode)
