"""Calibration for binary token representations, fitted on the collection's own layer-k states.

The paper recovers passage states with a trained decoder (its "passage representation recovery" loss); here
the cheap closed-form floor:
- a learned channel mean `centre`: signs are taken of h - centre, so channels that are always positive
  (LLM hidden states have a few huge, nearly constant channels) stop wasting their bit;
- a ridge least-squares decoder from [plain reconstruction, first-plane signs, 1] to the true state.
Saved as safetensors bytes (no pickle).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..models.packed import linear
from .binary import FLOAT_BITS, Codes, encode


@dataclass
class Decoder:
    centre: np.ndarray  # [d]
    weight: np.ndarray | None  # [2d + 1, d] or None (float states need no decoder)

    def decode(self, codes: Codes) -> np.ndarray:
        plain = codes.reconstruct(self.centre)
        if self.weight is None or codes.bits == FLOAT_BITS:
            return plain
        # torch, not numpy: numpy's BLAS ignores the thread budget torch was given and stalls on a busy CPU;
        # through the packed oneDNN kernel, 2-4x faster than MKL's fp32 on AMD CPUs (models/packed.py)
        with torch.no_grad():
            return linear(torch.from_numpy(features(codes, plain, self.centre)), self.projection).numpy()

    @functools.cached_property
    def projection(self) -> torch.Tensor:
        """The weight as a [d, 2d + 1] torch tensor that lives with the decoder (it carries its oneDNN pack)."""
        return torch.from_numpy(np.ascontiguousarray(self.weight.T))

    def to_bytes(self) -> bytes:
        """fp16: the decoder is stored once per collection and counted in its storage; half of fp32 (1.33 MB
        instead of 2.66 MB at d=576). Encode with `from_bytes(to_bytes())` so codes and decoding see the same
        rounded centre."""
        tensors = {"centre": _half(self.centre)}
        if self.weight is not None:
            tensors["weight"] = _half(self.weight)
        return st_save(tensors)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Decoder":
        tensors = st_load(blob)
        weight = tensors.get("weight")
        return cls(tensors["centre"].astype(np.float32), None if weight is None else weight.astype(np.float32))


def _half(x: np.ndarray) -> np.ndarray:
    """fp16 where every value fits (|x| < 65504), else fp32 rather than infinities."""
    half = x.astype(np.float16)
    return half if np.isfinite(half).all() else x.astype(np.float32)


def features(codes: Codes, plain: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """What the least-squares decoder reads: the scaled reconstruction, the raw first-plane signs
    (scale-free, so the fit can weight channels differently from the per-token scale), and a bias."""
    first = codes.signs()[0]
    return np.concatenate([plain - centre, first, np.ones((codes.n, 1), np.float32)], axis=1)


def fit_decoder(states: list[np.ndarray], bits: int, ridge: float = 1e-3, max_tokens: int = 40000,
                seed: int = 0) -> Decoder:
    """Closed form: centre = channel mean; W = argmin ||X W - H||^2 + ridge * tr(X'X)/p * ||W||^2."""
    every = np.concatenate(states).astype(np.float32)
    if len(every) > max_tokens:
        every = every[np.random.default_rng(seed).choice(len(every), max_tokens, replace=False)]
    centre = every.mean(axis=0)
    if bits == FLOAT_BITS:
        return Decoder(np.zeros_like(centre), None)
    codes = encode(every, bits, centre)
    x = features(codes, codes.reconstruct(centre), centre).astype(np.float64)
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += ridge * np.trace(gram) / len(gram)
    weight = np.linalg.solve(gram, x.T @ every.astype(np.float64))
    return Decoder(centre, weight.astype(np.float32))


def identity_decoder(d: int) -> Decoder:
    """Calibration off: signs of the raw state, decoded as sum of scale * sign."""
    return Decoder(np.zeros(d, np.float32), None)


# ------------------------------------------------------------------------------- trained recovery (STE)

class StraightThrough(torch.autograd.Function):
    """Forward: `quantised` exactly (the stored code's values, not re-derived, so no float round-off can creep
    in); backward: the gradient passes to the float input unchanged where `keep` is true, else 0 (a clipped
    identity for the sign, as in binarised networks)."""

    @staticmethod
    def forward(ctx, x, quantised, keep):
        ctx.save_for_backward(keep)
        return quantised.clone()

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad * keep, None, None


def ste_features(states: torch.Tensor, codes: Codes, centre: np.ndarray) -> torch.Tensor:
    """`features` of the stored codes in the autograd graph of the float states [n, d] they were encoded from:
    the forward value is bit for bit `features(codes, ...)`; the backward is the identity into the states for
    the scaled reconstruction, and the identity clipped to |h - centre| <= step for the signs."""
    plain = codes.reconstruct(centre)
    exact = torch.from_numpy(features(codes, plain, centre))
    d = codes.d
    x = states.float() - torch.from_numpy(centre.astype(np.float32))
    step = torch.from_numpy(codes.scales.astype(np.float32))[:, None]
    recon = StraightThrough.apply(x, exact[:, :d], torch.ones_like(x, dtype=torch.bool))
    signs = StraightThrough.apply(x, exact[:, d:2 * d], x.abs() <= step)
    return torch.cat([recon, signs, exact[:, 2 * d:]], dim=1)


class TrainableDecoder(torch.nn.Module):
    """The least-squares decoder as a trainable map (passage representation recovery): the weight starts at the
    closed-form fit and learns; the centre stays fixed, because the stored codes are sign/grid values of
    h - centre and so depend on the centre only: keeping it fixed keeps every stored code valid.

    The weight is fit + delta x (the fit's RMS per output channel), delta starting at 0: an optimizer step of a
    given size then changes every channel by the same fraction, whatever the model's state scale (LLM states
    have channels hundreds of times larger than others), and the untrained decoder is the fit exactly."""

    def __init__(self, fitted: Decoder):
        super().__init__()
        self.centre = fitted.centre
        fit = torch.from_numpy(fitted.weight.copy())
        self.register_buffer("fit", fit)
        self.register_buffer("scale", (fit ** 2).mean(dim=0, keepdim=True).sqrt().clamp_min(1e-12))
        self.delta = torch.nn.Parameter(torch.zeros_like(fit))

    @property
    def weight(self) -> torch.Tensor:
        return self.fit + self.delta * self.scale

    def forward(self, codes: Codes, states: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded states [n, d]: the same math as `Decoder.decode` (features @ weight, fp32); through the
        straight-through quantiser when the float `states` the codes came from are given."""
        feats = (ste_features(states, codes, self.centre) if states is not None
                 else torch.from_numpy(features(codes, codes.reconstruct(self.centre), self.centre)))
        return feats @ self.weight

    def frozen(self) -> Decoder:
        return Decoder(self.centre, self.weight.detach().numpy().copy())
