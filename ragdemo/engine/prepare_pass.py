"""One forward per batch of chunks feeds every method's offline artifacts.

Every per-chunk artifact starts from the same computation: the chunk's tokens (prompt.passage_ids) read alone
behind the shared instruction prefix. BTR keeps the states entering its split layer, CacheBlend every layer's
KV, LLoCO that KV plus KVzip-style reconstruction scores, lingua the per-token surprisal. Here each chunk runs
through the model once, in batches, and every consumer takes what it asked for (`Needs`) from the same result
(`ChunkPass`); the methods keep turning that into their own artifacts, keys and formats.

- Batches: chunks sorted by length and right-padded to the longest of their batch. Padding sits after every
  real token of its row, so the causal mask alone keeps it out of every real token's attention: the batched
  forward computes, row by row, what the chunk's own forward computes.
- LLoCO's reconstruction pass is the same forward: its rows read [passage, cue, passage again]. The passage
  part is causal, so it is exactly everyone else's forward; the repeated part's queries give the scores.
- Only as deep as asked: chunks that only need BTR's lower states (a decoder refit over old chunks) run layers
  [0, split) alone, and the vocabulary projection runs only for chunks whose surprisal is wanted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache

from .kv import RECONSTRUCT_CUE, PassageKV, cache_from, rotate_keys
from .layers import CAUSAL, embed, logits, positions, rotate_half, run_layers
from .prefix import PrefixState, shared_prefix
from .prompt import encode

BATCH_TOKENS = 2048  # query rows per forward (padding included): wide enough that the matmuls run at full speed
LOGIT_ROWS = 512  # positions projected onto the vocabulary at a time (49k floats each)


@dataclass(frozen=True)
class Needs:
    """What a consumer takes from a chunk's forward."""

    states_at: frozenset = frozenset()  # layer indices i: the hidden states entering layer i (BTR's split)
    kv: bool = False  # every layer's keys (RoPE taken off, fp32) and values
    surprisal: bool = False  # -log p of each token given the prefix and the tokens before it
    reconstruct: bool = False  # KVzip scores from a "repeat the context" cue and the passage again (implies kv)

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.states_at | other.states_at, self.kv or other.kv, self.surprisal or other.surprisal,
                     self.reconstruct or other.reconstruct)

    def depth(self, n_layers: int) -> int:
        """Layers the forward must run."""
        if self.kv or self.surprisal or self.reconstruct:
            return n_layers
        return max(self.states_at, default=0)


@dataclass
class ChunkPass:
    """One chunk's share of a batched forward; fields a consumer did not ask for may be None (or absent)."""

    ids: list[int]
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, hidden] float32
    kv: PassageKV | None = None  # keys position-free in fp32, values in the model's dtype
    surprisal: torch.Tensor | None = None  # [n] float32 nats, on the CPU
    scores: torch.Tensor | None = None  # [layers, kv heads, n] reconstruction importance


@dataclass
class PassRequest:
    """One consumer's chunks: content key -> token ids, all behind the same prefix ((): none)."""

    needs: Needs
    sequences: dict[str, list[int]]
    prefix_ids: tuple[int, ...] = ()


@dataclass
class PassBatch:
    """What one forward finished: per request, (key, ChunkPass) of its chunks in this batch; tokens counts
    chunk tokens (not padding or the reconstruction rows), `done`/`total` over the whole pass."""

    taken: list[list[tuple[str, ChunkPass]]]
    tokens: int
    done: int
    total: int
    seconds: float  # model time so far in this pass


class SharedPass:
    """The chunks of every request, each run once with the union of what its requests need."""

    def __init__(self, lm, requests: list[PassRequest], batch_tokens: int | None = None):
        self.lm, self.requests, self.batch_tokens = lm, requests, batch_tokens or BATCH_TOKENS
        wanted: dict[tuple, Needs] = {}
        ids: dict[tuple, list[int]] = {}
        for request in requests:
            for key, seq in request.sequences.items():
                unit = (request.prefix_ids, key)
                wanted[unit] = wanted.get(unit, Needs()) | request.needs
                ids[unit] = seq
        self.units = [(unit, ids[unit], needs) for unit, needs in wanted.items()]
        self.total = sum(len(seq) for _, seq, _ in self.units)

    def batches(self) -> Iterator[PassBatch]:
        """Runs the forwards; the caller stores each batch's artifacts (and may stop) between two of them."""
        groups: dict[tuple, list] = {}
        for unit, seq, needs in self.units:
            groups.setdefault((unit[0], needs), []).append((unit, seq))
        done, seconds = 0, 0.0
        for (prefix_ids, needs), items in groups.items():
            items.sort(key=lambda item: len(item[1]))
            for batch in batched(items, needs, self.batch_tokens, len(self._cue())):
                started = time.perf_counter()
                prefix = shared_prefix(self.lm, list(prefix_ids)) if prefix_ids else None
                passes = forward_chunks(self.lm, prefix, [seq for _, seq in batch], needs, self._cue())
                seconds += time.perf_counter() - started
                by_unit = {unit: p for (unit, _), p in zip(batch, passes)}
                tokens = sum(len(seq) for _, seq in batch)
                done += tokens
                taken = [[(key, by_unit[(r.prefix_ids, key)]) for key in r.sequences if (r.prefix_ids, key) in by_unit]
                         for r in self.requests]
                yield PassBatch(taken, tokens, done, self.total, seconds)

    def _cue(self) -> list[int]:
        return encode(self.lm.tokenizer, RECONSTRUCT_CUE)


def batched(items: list, needs: Needs, budget: int | None = None, cue: int = 0) -> Iterator[list]:
    """Consecutive (key, ids) items, sorted by length, while rows x padded width stays within `budget` tokens
    (default BATCH_TOKENS; `cue`: the reconstruction cue's length, when `needs` asks for it)."""
    budget = budget or BATCH_TOKENS
    batch: list = []
    for item in items:
        width = _row_length(len(item[1]), needs, cue)
        if batch and (len(batch) + 1) * width > budget:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _row_length(n: int, needs: Needs, cue: int) -> int:
    return 2 * n + cue if needs.reconstruct else n


def forward_chunks(lm, prefix: PrefixState | None, sequences: list[list[int]], needs: Needs,
                   cue: list[int] | None = None) -> list[ChunkPass]:
    """One batched forward: each sequence read alone right after the prefix (its per-layer KV; None: nothing
    before it), every row at positions len(prefix).. . Returns one ChunkPass per sequence, in order. `cue`
    (reconstruct only) defaults to RECONSTRUCT_CUE."""
    if needs.surprisal and (prefix is None or prefix.last_logits is None):
        raise ValueError("surprisal needs a prefix's last logits: they predict a chunk's first token")
    if any(not seq for seq in sequences):
        raise ValueError("every chunk needs at least one token")
    cue = list(cue if cue is not None else encode(lm.tokenizer, RECONSTRUCT_CUE)) if needs.reconstruct else []
    lengths = [len(seq) for seq in sequences]
    rows = [seq + cue + seq if needs.reconstruct else seq for seq in sequences]
    width, size = max(map(len, rows)), len(rows)
    start = prefix.layers[0][0].shape[2] if prefix is not None else 0
    ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], device=lm.device)
    cache = cache_from([(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)) for k, v in prefix.layers]) \
        if prefix is not None else DynamicCache()
    out = [ChunkPass(seq) for seq in sequences]
    tap = _QueryTap(lm) if needs.reconstruct else None
    scores = []
    try:
        with torch.inference_mode():
            hidden = embed(lm, ids)
            pos = positions(start, width, lm.device)
            _keep_states(out, hidden, 0, needs, lengths)
            for layer in range(needs.depth(lm.n_layers)):
                hidden = run_layers(lm, hidden, layer, layer + 1, pos, CAUSAL, cache)
                _keep_states(out, hidden, layer + 1, needs, lengths)
                if tap:
                    scores.append(tap.scores(layer, cache.layers[layer].keys, start, lengths, len(cue)))
            if needs.kv or needs.reconstruct:
                _keep_kv(lm, out, cache, start, lengths)
            if needs.surprisal:
                _keep_surprisal(lm, out, hidden, ids, prefix, lengths)
    finally:
        if tap:
            tap.close()
    if scores:
        stacked = torch.stack(scores)  # [layers, batch, kv heads, longest]
        for b, n in enumerate(lengths):
            out[b].scores = stacked[:, b, :, :n].clone()
    return out


def _keep_states(out: list[ChunkPass], hidden: torch.Tensor, layer: int, needs: Needs, lengths: list[int]) -> None:
    if layer in needs.states_at:
        for b, n in enumerate(lengths):
            out[b].states[layer] = hidden[b, :n].to(torch.float32, copy=True)  # not a view of the whole batch


def _keep_kv(lm, out: list[ChunkPass], cache, start: int, lengths: list[int]) -> None:
    """Each row's passage keys and values from every layer, keys rotated back to position 0 in one call."""
    longest = max(lengths)
    keys = torch.stack([layer.keys[:, :, start:start + longest] for layer in cache.layers])  # [L, B, H, n, d]
    values = torch.stack([layer.values[:, :, start:start + longest] for layer in cache.layers])
    offsets = torch.arange(longest, device=keys.device)
    keys = rotate_keys(lm, keys.float(), -(offsets + start).expand(keys.shape[:-1]))  # fp32: no double rounding
    for b, n in enumerate(lengths):
        kept = offsets[:n].expand(keys.shape[0], keys.shape[2], n).clone()
        out[b].kv = PassageKV(keys[:, b, :, :n].clone(), values[:, b, :, :n].clone(), kept, n)


def _keep_surprisal(lm, out: list[ChunkPass], hidden: torch.Tensor, ids: torch.Tensor, prefix: PrefixState,
                    lengths: list[int]) -> None:
    """Token 0 is predicted by the prefix's last position, token i by the chunk's position i-1; only the real
    positions that predict a token are projected onto the vocabulary."""
    first = prefix.last_logits[0, -1].float()
    first_nats = torch.logsumexp(first, -1) - first[ids[:, 0]]
    rows = [(b, i) for b, n in enumerate(lengths) for i in range(n - 1)]
    nats = torch.empty(len(rows))
    if rows:
        index_b = torch.tensor([b for b, _ in rows], device=hidden.device)
        index_i = torch.tensor([i for _, i in rows], device=hidden.device)
        picked = hidden[index_b, index_i]
        targets = ids[index_b, index_i + 1]
        for a in range(0, len(rows), LOGIT_ROWS):
            scores = logits(lm, picked[a:a + LOGIT_ROWS]).float()
            got = scores.gather(-1, targets[a:a + LOGIT_ROWS, None])[:, 0]
            nats[a:a + LOGIT_ROWS] = (torch.logsumexp(scores, -1) - got).cpu()
    at = 0
    for b, n in enumerate(lengths):
        out[b].surprisal = torch.cat([first_nats[b:b + 1].cpu(), nats[at:at + n - 1]])
        at += n - 1


class _QueryTap:
    """Each layer's rotated queries during one forward (SDPA does not return attention weights): the q
    projection's own output and the layer's RoPE angles, caught by hooks, so nothing is computed twice."""

    def __init__(self, lm):
        self.layers = lm.model.model.layers
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.raw: torch.Tensor | None = None
        self.handles = []
        for layer in self.layers:
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._angles, with_kwargs=True))
            self.handles.append(layer.self_attn.q_proj.register_forward_hook(self._query))

    def _angles(self, module, args, kwargs):
        self.rope = kwargs["position_embeddings"]

    def _query(self, module, args, output):
        self.raw = output

    def queries(self, layer: int, low: int = 0) -> torch.Tensor:
        """[B, Hq, w - low, d] fp32 of row positions low.., RoPE applied: exactly what the layer's attention
        multiplied with its keys."""
        attn = self.layers[layer].self_attn
        raw = self.raw[:, low:]
        q = raw.view(*raw.shape[:-1], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3 normalises each head before RoPE
            q = attn.q_norm(q)
        q = q.transpose(1, 2).float()
        cos, sin = (t[:, low:].float().unsqueeze(1) for t in self.rope)
        return q * cos + rotate_half(q) * sin

    def scores(self, layer: int, keys: torch.Tensor, start: int, lengths: list[int], cue: int) -> torch.Tensor:
        """[B, H_kv, longest]: per passage token, the most attention any token of its row's repeated part (cue
        and passage again) pays it, max over the query heads sharing the KV head (KVzip).

        Only the rows some row's repeated part covers are computed; the causal mask is added inside the product
        (baddbmm); the maximum is taken over log-probabilities and exponentiated last (exp is monotonic), so the
        only pass over every key is the softmax's normaliser."""
        low = min(lengths)  # the first row position that is in some row's repeated part
        q = self.queries(layer, low)
        size, heads, rows, dim = q.shape
        kv_heads, total = keys.shape[1], keys.shape[2]
        group = heads // kv_heads
        query_pos = torch.arange(low, low + rows, device=keys.device)
        hidden = torch.arange(total, device=keys.device)[None, :] > (start + query_pos)[:, None]  # [rows, T]
        bias = torch.zeros(rows, total, device=keys.device).masked_fill_(hidden, float("-inf")).repeat(group, 1)
        q = q.reshape(size * kv_heads, group * rows, dim)
        logits_ = torch.baddbmm(bias, q, keys.float().reshape(size * kv_heads, total, dim).transpose(1, 2),
                                alpha=1.0 / math.sqrt(dim)).view(size, kv_heads, group, rows, total)
        longest = max(lengths)
        log_p = logits_[..., start:start + longest] - torch.logsumexp(logits_, dim=-1, keepdim=True)
        n = torch.tensor(lengths, device=keys.device)[:, None]
        repeated = (query_pos[None, :] >= n) & (query_pos[None, :] < 2 * n + cue)  # [B, rows]: real repeated tokens
        log_p = log_p.masked_fill_(~repeated[:, None, None, :, None], float("-inf"))
        return log_p.amax(dim=3).amax(dim=2).exp()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
