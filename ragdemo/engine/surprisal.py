"""Per-token surprisal (self-information) of passages read behind a prefix: what LLMLingua-style
compression ranks tokens by. A token the model predicts well carries little information and can go."""
from __future__ import annotations

import torch

from .prefix import PrefixState
from .prepare_pass import Needs, batched, forward_chunks

NEEDS = Needs(surprisal=True)


def surprisal(lm, prefix: PrefixState, sequences: list[list[int]]) -> list[torch.Tensor]:
    """For each sequence read alone right after `prefix`: -log p(token | prefix, earlier tokens), in nats,
    float32 on the CPU: the shared preparation pass's surprisal (batched, right-padded), for a prefix of the
    caller's (e.g. one holding the question)."""
    out: dict[int, torch.Tensor] = {}
    for batch in _batches(sequences):
        for (i, _), result in zip(batch, forward_chunks(lm, prefix, [seq for _, seq in batch], NEEDS)):
            out[i] = result.surprisal
    return [out.get(i, torch.zeros(0)) for i in range(len(sequences))]


def computed_rows(sequences: list[list[int]]) -> int:
    """The token rows `surprisal` runs through the model for these sequences, padding included (what it costs)."""
    return sum(len(batch) * max(len(seq) for _, seq in batch) for batch in _batches(sequences))


def _batches(sequences: list[list[int]]) -> list[list[tuple[int, list[int]]]]:
    """(index, ids) of the non-empty sequences, sorted by length and batched as the shared pass batches them."""
    indexed = sorted(((i, seq) for i, seq in enumerate(sequences) if seq), key=lambda item: len(item[1]))
    return list(batched(indexed, NEEDS))
