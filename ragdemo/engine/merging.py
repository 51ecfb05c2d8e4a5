"""Token merging by bipartite matching: ToMe-style at runtime (cosine, float states) and BTR's offline
Algorithm 1 (Hamming distance, binary codes, per vocabulary token).

All split the candidates alternately into sets A and B, match every A token to its most similar B token,
and fold the best-matched fraction of A into their partners, so one pass removes up to half the tokens.
`bipartite_merge` folds once over all candidates; `merge_within_groups` is the per-layer ToMe step: it keeps
each token's size (how many original tokens it stands for) so attention can weigh it by log(size).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F



@dataclass
class Merged:
    hidden: torch.Tensor  # [1, T', d]
    pos: torch.Tensor  # [1, T']
    keep: torch.Tensor  # indices into the old sequence that survive, in order
    removed: int


def bipartite_merge(hidden: torch.Tensor, pos: torch.Tensor, candidates: torch.Tensor, ratio: float) -> Merged:
    """Merge `ratio` x len(candidates) of the candidate tokens (passage tokens) into their most cosine-similar
    partner. A token is only folded into a LATER partner, which then stays at its own (later) position, so no
    state moves earlier in the causal order. ratio 0 returns the input unchanged."""
    seq = hidden.shape[1]
    n_remove = min(int(ratio * len(candidates)), len(candidates) // 2)
    if n_remove <= 0:
        return Merged(hidden, pos, torch.arange(seq, device=hidden.device), 0)
    a_idx, b_idx = candidates[0::2], candidates[1::2]
    a, b = F.normalize(hidden[0, a_idx].float(), dim=-1), F.normalize(hidden[0, b_idx].float(), dim=-1)
    sim = a @ b.T
    sim = sim.masked_fill(b_idx[None, :] <= a_idx[:, None], float("-inf"))  # only merge forward in time
    score, partner = sim.max(dim=1)
    n_remove = min(n_remove, int(torch.isfinite(score).sum()))
    order = score.argsort(descending=True)[:n_remove]
    src, dst = a_idx[order], b_idx[partner[order]]
    # average each destination with everything folded into it (ToMe's size-weighted mean, sizes start at 1)
    total = hidden[0].float().clone()
    size = torch.ones(seq, device=hidden.device)
    total.index_add_(0, dst, hidden[0, src].float())
    size.index_add_(0, dst, torch.ones(len(dst), device=hidden.device))
    merged = (total / size[:, None]).to(hidden.dtype)
    keep_mask = torch.ones(seq, dtype=torch.bool, device=hidden.device)
    keep_mask[src] = False
    keep = keep_mask.nonzero().squeeze(1)
    return Merged(merged[keep][None], pos[:, keep], keep, len(src))


@dataclass
class Sized:
    """Tokens that per-layer merging works on: states, positions, each token's size (original tokens it stands
    for) and group (the passage it belongs to; -1 = never merged, e.g. the question)."""

    hidden: torch.Tensor  # [1, T, d]
    pos: torch.Tensor  # [1, T]
    size: torch.Tensor  # [T] float
    group: torch.Tensor  # [T] long

    def log_size(self) -> torch.Tensor:
        return self.size.log()


def sized(hidden: torch.Tensor, pos: torch.Tensor, group: torch.Tensor) -> Sized:
    return Sized(hidden, pos, torch.ones(hidden.shape[1], device=hidden.device), group.to(hidden.device))


def merge_within_groups(tokens: Sized, ratio: float) -> tuple[Sized, int]:
    """One ToMe step: in every group g >= 0, fold int(ratio x its tokens) of them into their most cosine-similar
    later partner of the same group (alternate tokens of the group form A and B). Merged states are the
    size-weighted mean and sizes add up, so a group's sizes always sum to its original length; a partner keeps
    its own (later) position. Tokens of group -1 are never touched. Returns the new tokens and how many went."""
    cand = (tokens.group >= 0).nonzero().squeeze(1)
    if ratio <= 0 or len(cand) < 2:
        return tokens, 0
    group = tokens.group[cand]
    rank = _rank_within(group, torch.arange(len(cand), device=cand.device))
    is_a = rank % 2 == 0
    a_idx, b_idx = cand[is_a], cand[~is_a]
    a_group, b_group = group[is_a], group[~is_a]
    states = tokens.hidden[0].float()
    sim = F.normalize(states[a_idx], dim=-1) @ F.normalize(states[b_idx], dim=-1).T
    allowed = (a_group[:, None] == b_group[None, :]) & (b_idx[None, :] > a_idx[:, None])  # same passage, later
    score, partner = sim.masked_fill(~allowed, float("-inf")).max(dim=1)
    budget = torch.floor(ratio * torch.bincount(group).double()).long()  # per group, of its tokens now
    by_score = _rank_within(a_group, -score)
    chosen = (by_score < budget[a_group]) & torch.isfinite(score)
    src, dst = a_idx[chosen], b_idx[partner[chosen]]
    if len(src) == 0:
        return tokens, 0
    weighted = states * tokens.size[:, None]
    total = weighted.index_add(0, dst, weighted[src])
    size = tokens.size.index_add(0, dst, tokens.size[src])
    touched = torch.unique(dst)
    states = states.clone()
    states[touched] = total[touched] / size[touched, None]
    keep = torch.ones(len(size), dtype=torch.bool, device=size.device)
    keep[src] = False
    merged = Sized(states[keep][None].to(tokens.hidden.dtype), tokens.pos[:, keep], size[keep], tokens.group[keep])
    return merged, len(src)


def _rank_within(group: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Each element's rank among the elements of its group, ordered by `key` ascending (ties: first first)."""
    by_key = torch.argsort(key, stable=True)
    order = by_key[torch.argsort(group[by_key], stable=True)]  # by group, then by key within the group
    sorted_group = group[order]
    first = torch.searchsorted(sorted_group, sorted_group)  # where each element's group starts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=group.device) - first
    return rank


# ------------------------------------------------------------------ offline: paper Algorithm 1

@dataclass
class Codebook:
    """Unique binary codes after offline merging; `index[i]` says which code token occurrence i now uses."""

    codes: np.ndarray  # [m, w] uint8, packed planes of one token
    scales: np.ndarray  # [m] float16 per-token steps
    index: np.ndarray  # [N] int


BLOCK_BYTES = 32 << 20  # working memory per step: distance blocks, unpacked bits


def merge_by_token(token_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray, ratio: float,
                   stopword_ids: set[int], d_bits: int) -> Codebook:
    """Every occurrence of one vocabulary token across the corpus is a candidate group. Stopword groups
    collapse to one vector; other groups go through one bipartite round on Hamming distance that folds
    `ratio` of the occurrences (at most half) into their nearest partner. Each merged group's code is the
    bitwise majority of its members (ties: the partner's own bit) and its scale their mean.

    Linear in the collection apart from the per-token distance matrices, which are computed on packed bits in
    blocks of bounded size: one sort finds every token's occurrences, one sort finds every merged group."""
    parent = _partners(np.asarray(token_ids), codes, ratio, stopword_ids)
    return _fold(parent, codes, scales, d_bits)


def _partners(token_ids: np.ndarray, codes: np.ndarray, ratio: float, stopword_ids: set[int]) -> np.ndarray:
    """parent[i] = the occurrence that i is folded into (itself when kept)."""
    parent = np.arange(len(token_ids))
    order = np.argsort(token_ids, kind="stable")  # each token's occurrences, in corpus order
    sorted_tokens = token_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_tokens[1:] != sorted_tokens[:-1]]) if len(order) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)]
    words = _as_words(codes)
    for start, end in zip(starts[ends - starts >= 2], ends[ends - starts >= 2]):
        members = order[start:end]
        if int(sorted_tokens[start]) in stopword_ids:
            parent[members] = members[0]
            continue
        n_remove = min(int(ratio * len(members)), len(members) // 2)
        if n_remove <= 0:
            continue
        a, b = members[0::2], members[1::2]
        nearest, distance = nearest_hamming(words[a], words[b])
        best = np.argsort(distance, kind="stable")[:n_remove]
        parent[a[best]] = b[nearest[best]]
    return parent


def _as_words(codes: np.ndarray) -> np.ndarray:
    """Packed uint8 codes [n, w] viewed as uint64 words [n, ceil(w/8)] (zero padding adds no distance)."""
    pad = -codes.shape[1] % 8
    if pad:
        codes = np.concatenate([codes, np.zeros((len(codes), pad), np.uint8)], axis=1)
    return np.ascontiguousarray(codes).view(np.uint64)


def nearest_hamming(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a [m, W] (uint64 words), the first row of b [n, W] at the least Hamming distance and
    that distance, in blocks of a's rows so no block holds more than BLOCK_BYTES of XORed words."""
    nearest = np.empty(len(a), np.int64)
    distance = np.empty(len(a), np.int32)
    rows = max(1, BLOCK_BYTES // max(1, b.size * 8))
    for start in range(0, len(a), rows):
        block = np.bitwise_count(a[start:start + rows, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int32)
        nearest[start:start + rows] = block.argmin(axis=1)
        distance[start:start + rows] = block[np.arange(len(block)), nearest[start:start + rows]]
    return nearest, distance


def _fold(parent: np.ndarray, codes: np.ndarray, scales: np.ndarray, d_bits: int) -> Codebook:
    """One code and scale per merged group, in the order of the groups' roots."""
    roots, index = np.unique(parent, return_inverse=True)
    index = index.reshape(-1)
    sizes = np.bincount(index, minlength=len(roots))
    merged_codes = codes[roots].copy()  # a group of one keeps its code byte for byte
    merged_scales = scales[roots].astype(np.float16)
    multi = np.flatnonzero(sizes > 1)
    if len(multi):
        by_group = np.argsort(index, kind="stable")  # members of each group together, in corpus order
        members = by_group[np.repeat(sizes > 1, sizes)]  # only the groups of two or more
        offsets = np.r_[0, np.cumsum(sizes[multi])]
        merged_codes[multi] = _majorities(codes, members, offsets, codes[roots[multi]], d_bits)
        merged_scales[multi] = _means(scales, members, offsets)
    return Codebook(merged_codes, merged_scales, index)


def _majorities(codes: np.ndarray, members: np.ndarray, offsets: np.ndarray, root_codes: np.ndarray,
                d_bits: int) -> np.ndarray:
    """Bitwise majority vote of each group's codes (ties go to the root's bit), re-packed: 'average, then
    sign'. Groups are taken a batch at a time so the unpacked bits stay within BLOCK_BYTES."""
    out = np.empty((len(offsets) - 1, codes.shape[1]), np.uint8)
    budget = max(1, BLOCK_BYTES // (4 * d_bits))
    group = 0
    while group < len(out):
        last = max(group + 1, int(np.searchsorted(offsets, offsets[group] + budget, side="right")) - 1)
        last = min(last, len(out))
        ones = _bit_counts(codes, members, offsets[group:last + 1], d_bits, budget)
        size = np.diff(offsets[group:last + 1])[:, None]
        first = np.unpackbits(root_codes[group:last], axis=-1, count=d_bits)
        vote = np.where(2 * ones == size, first, (2 * ones > size).astype(np.uint8))
        out[group:last] = np.packbits(vote, axis=-1)
        group = last
    return out


def _bit_counts(codes, members, offsets, d_bits: int, budget: int) -> np.ndarray:
    """Set bits per position summed over each group [offsets[i], offsets[i+1]) of `members`."""
    if len(offsets) == 2 and offsets[1] - offsets[0] > budget:  # one very frequent token: sum in slices
        ones = np.zeros((1, d_bits), np.int64)
        for start in range(offsets[0], offsets[1], budget):
            rows = members[start:min(start + budget, offsets[1])]
            ones[0] += np.unpackbits(codes[rows], axis=-1, count=d_bits).sum(axis=0, dtype=np.int64)
        return ones
    bits = np.unpackbits(codes[members[offsets[0]:offsets[-1]]], axis=-1, count=d_bits)
    return np.add.reduceat(bits, offsets[:-1] - offsets[0], axis=0, dtype=np.int64)


def _means(scales: np.ndarray, members: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each group's mean scale in float32, like numpy's mean of the group alone: groups of one size at a time,
    one row each, so every row is reduced in the same pairwise order as a lone 1-D mean."""
    sizes = np.diff(offsets)
    out = np.empty((len(sizes),) + scales.shape[1:], np.float32)
    for size in np.unique(sizes):
        groups = np.flatnonzero(sizes == size)
        rows = members[offsets[groups][:, None] + np.arange(size)]
        out[groups] = scales[rows].astype(np.float32).mean(axis=1)
    return out.astype(np.float16)
