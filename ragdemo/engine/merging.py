"""Token merging by bipartite matching: ToMe-style at runtime (cosine, float states) and BTR's offline
Algorithm 1 (Hamming distance, binary codes, per vocabulary token).

Both split the candidates alternately into sets A and B, match every A token to its most similar B token,
and fold the best-matched fraction of A into their partners, so one pass removes up to half the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .binary import hamming


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


# ------------------------------------------------------------------ offline: paper Algorithm 1

@dataclass
class Codebook:
    """Unique binary codes after offline merging; `index[i]` says which code token occurrence i now uses."""

    codes: np.ndarray  # [m, w] uint8, packed planes of one token
    scales: np.ndarray  # [m] float16 per-token steps
    index: np.ndarray  # [N] int


def _majority(codes: np.ndarray, d_bits: int) -> np.ndarray:
    """Bitwise majority vote of packed codes (ties go to the first code), re-packed: 'average, then sign'."""
    ones = np.unpackbits(codes, axis=-1, count=d_bits).astype(np.int32).sum(axis=0)
    first = np.unpackbits(codes[:1], axis=-1, count=d_bits)[0]
    vote = np.where(2 * ones == len(codes), first, (2 * ones > len(codes)).astype(np.uint8))
    return np.packbits(vote)


def merge_by_token(token_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray, ratio: float,
                   stopword_ids: set[int], d_bits: int) -> Codebook:
    """Every occurrence of one vocabulary token across the corpus is a candidate group. Stopword groups
    collapse to one vector; other groups go through one bipartite round on Hamming distance that folds
    `ratio` of the occurrences (at most half) into their nearest partner."""
    parent = np.arange(len(token_ids))
    for token in np.unique(token_ids):
        members = np.flatnonzero(token_ids == token)
        if len(members) < 2:
            continue
        if int(token) in stopword_ids:
            parent[members] = members[0]
            continue
        n_remove = min(int(ratio * len(members)), len(members) // 2)
        if n_remove <= 0:
            continue
        a, b = members[0::2], members[1::2]
        dist = hamming(codes[a], codes[b])
        nearest = dist.argmin(axis=1)
        best = np.argsort(dist[np.arange(len(a)), nearest], kind="stable")[:n_remove]
        parent[a[best]] = b[nearest[best]]
    roots, index = np.unique(parent, return_inverse=True)
    merged_codes = np.empty((len(roots), codes.shape[1]), np.uint8)
    merged_scales = np.empty((len(roots),) + scales.shape[1:], np.float16)
    for slot, root in enumerate(roots):
        group = np.flatnonzero(parent == root)
        order = np.concatenate([[root], group[group != root]])  # the root's own bit wins ties
        merged_codes[slot] = _majority(codes[order], d_bits) if len(group) > 1 else codes[root]
        merged_scales[slot] = scales[group].astype(np.float32).mean(axis=0)
    return Codebook(merged_codes, merged_scales, index)
