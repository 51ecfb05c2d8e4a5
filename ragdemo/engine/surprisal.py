"""Per-token surprisal (self-information) of passages read behind a prefix: what LLMLingua-style
compression ranks tokens by. A token the model predicts well carries little information and can go."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv import cache_from
from .prefix import PrefixState

BATCH = 8  # passages per forward: padding waste stays small for 64-token chunks


def surprisal(lm, prefix: PrefixState, sequences: list[list[int]]) -> list[torch.Tensor]:
    """For each sequence read alone right after `prefix`: -log p(token | prefix, earlier tokens), in nats,
    float32 on the CPU. Sequences are batched and right-padded; padding comes after every real token, so the
    causal mask keeps it from changing anything."""
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), BATCH):
        out += _batch(lm, prefix, sequences[start:start + BATCH])
    return out


def computed_rows(sequences: list[list[int]]) -> int:
    """The token rows `surprisal` runs through the model for these sequences, padding included (what it costs)."""
    batches = [sequences[i:i + BATCH] for i in range(0, len(sequences), BATCH)]
    return sum(len(batch) * max((len(s) for s in batch), default=0) for batch in batches)


def _batch(lm, prefix: PrefixState, sequences: list[list[int]]) -> list[torch.Tensor]:
    width = max((len(s) for s in sequences), default=0)
    if width == 0:
        return [torch.zeros(0) for _ in sequences]
    size = len(sequences)
    ids = torch.tensor([s + [s[-1] if s else 0] * (width - len(s)) for s in sequences], device=lm.device)
    layers = [(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)) for k, v in prefix.layers]
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, past_key_values=cache_from(layers), use_cache=True).logits
        # token 0 is predicted by the prefix's last position, token i by position i-1 of the passage
        predict = torch.cat([prefix.last_logits.to(logits.dtype).expand(size, 1, -1), logits[:, :-1]], dim=1)
        nats = -F.log_softmax(predict.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return [nats[i, :len(s)].cpu() for i, s in enumerate(sequences)]
