"""Binary token representations: a uniform b-bit grid packed with numpy (sign bits at b=1), fp16 states, the blob format.

A token's hidden state h (d floats) minus a centre is quantised per token with `bits` bits per dimension and
stored as `bits` packed bit planes (most significant first) plus one fp16 step per token. The most significant
plane is the sign, so bits=1 is the paper's binary representation: sign(h - centre) * mean|h - centre|.
For bits >= 2 the levels are a uniform mid-rise grid whose clipping range is chosen per token to minimise
the squared error (residual sign planes were tried first: 8 of them only cut the error ~30x, a uniform
grid ~10^4x). bits=16 keeps plain fp16 states (the "float" reference).

Blob layout (no pickle; little-endian): 16-byte header `BTR1`, n, d, bits (uint32 each), then either the packed
planes [bits, n, ceil(d/8)] uint8 followed by steps [n] float16, or the fp16 states [n, d].
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..models.attention import head_shape

MAGIC = b"BTR1"
FLOAT_BITS = 16
SUPPORTED_BITS = (1, 2, 4, 8, FLOAT_BITS)
_HEADER = struct.Struct("<4sIII")


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (16 = fp16 states), got {bits}")
    return bits


def pack_signs(x: np.ndarray) -> np.ndarray:
    """[n, d] floats -> [n, ceil(d/8)] uint8; bit = 1 where x >= 0."""
    return np.packbits(x >= 0, axis=-1)


def unpack_signs(packed: np.ndarray, d: int) -> np.ndarray:
    """Inverse of `pack_signs`: [n, d] of +1/-1 float32."""
    bits = np.unpackbits(packed, axis=-1, count=d)
    return bits.astype(np.float32) * 2.0 - 1.0


@dataclass
class Codes:
    """One passage's quantised states: `planes` [bits, n, ceil(d/8)] uint8 (most significant bit first) and
    `scales` [n] float16 steps, or `states` [n, d] float16 when bits == 16."""

    n: int
    d: int
    bits: int
    planes: np.ndarray | None = None
    scales: np.ndarray | None = None
    states: np.ndarray | None = None

    def signs(self) -> np.ndarray:
        """[bits, n, d] of +1/-1: the raw bit planes a learned decoder reads (plane 0 = sign)."""
        return np.stack([unpack_signs(p, self.d) for p in self.planes])

    def levels(self) -> np.ndarray:
        """Signed grid index + 0.5 per dimension: [n, d] in {-2^(b-1)+0.5, ..., 2^(b-1)-0.5}."""
        unsigned = np.zeros((self.n, self.d), np.int32)
        for plane in self.planes:
            unsigned = unsigned * 2 + np.unpackbits(plane, axis=-1, count=self.d)
        return unsigned.astype(np.float32) - 2 ** (self.bits - 1) + 0.5

    def reconstruct(self, centre: np.ndarray | None = None) -> np.ndarray:
        """The plain (uncalibrated) decode: centre + step * level, float32 [n, d]."""
        if self.bits == FLOAT_BITS:
            return self.states.astype(np.float32)
        out = self.scales.astype(np.float32)[:, None] * self.levels()
        return out if centre is None else out + centre.astype(np.float32)


def _quantise(x: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    half = 2 ** (bits - 1)
    return np.clip(np.floor(x / step[:, None]), -half, half - 1)


def _best_steps(x: np.ndarray, bits: int) -> np.ndarray:
    """Per token, the grid step with the least squared error among clipping ranges 1..6 rms and no clipping."""
    if bits == 1:
        return 2.0 * np.abs(x).mean(axis=1)  # levels +-step/2 = +-mean|x|, the L2-optimal sign scale
    rms = np.sqrt((x ** 2).mean(axis=1)) + 1e-12
    clips = [c * rms for c in np.linspace(1.0, 6.0, 21)] + [np.abs(x).max(axis=1) + 1e-12]
    best, best_err = None, None
    for clip in clips:
        step = (2.0 * clip / 2 ** bits).astype(np.float16).astype(np.float32)
        err = ((( _quantise(x, step, bits) + 0.5) * step[:, None] - x) ** 2).sum(axis=1)
        if best is None:
            best, best_err = step, err
        else:
            better = err < best_err
            best, best_err = np.where(better, step, best), np.where(better, err, best_err)
    return best


def encode(states: np.ndarray, bits: int, centre: np.ndarray | None = None) -> Codes:
    """Quantise [n, d] float states to `bits` bit planes around `centre` (or keep fp16 when bits == 16)."""
    check_bits(bits)
    states = np.asarray(states, np.float32)
    n, d = states.shape
    if bits == FLOAT_BITS:
        return Codes(n, d, bits, states=states.astype(np.float16))
    x = states - centre if centre is not None else states
    step = np.maximum(_best_steps(x, bits), 1e-6).astype(np.float16)
    unsigned = (_quantise(x, step.astype(np.float32), bits) + 2 ** (bits - 1)).astype(np.int32)
    planes = np.stack([np.packbits((unsigned >> shift) & 1, axis=-1).astype(np.uint8)
                       for shift in range(bits - 1, -1, -1)])
    return Codes(n, d, bits, planes=planes, scales=step)


def encode_many(states: list[np.ndarray], bits: int, centre: np.ndarray | None = None) -> list[Codes]:
    """`encode` of each passage, in one vectorised call: the quantisation is per token, so encoding the
    concatenation and splitting it gives each passage's own codes."""
    if not states:
        return []
    codes = encode(np.concatenate(states), bits, centre)
    bounds = np.cumsum([0] + [len(s) for s in states])
    out = []
    for a, b in zip(bounds, bounds[1:]):
        if bits == FLOAT_BITS:
            out.append(Codes(int(b - a), codes.d, bits, states=codes.states[a:b]))
        else:
            out.append(Codes(int(b - a), codes.d, bits, planes=codes.planes[:, a:b], scales=codes.scales[a:b]))
    return out


def to_blob(codes: Codes) -> bytes:
    header = _HEADER.pack(MAGIC, codes.n, codes.d, codes.bits)
    if codes.bits == FLOAT_BITS:
        return header + np.ascontiguousarray(codes.states, "<f2").tobytes()
    return header + np.ascontiguousarray(codes.planes, np.uint8).tobytes() + np.ascontiguousarray(codes.scales, "<f2").tobytes()


def from_blob(blob: bytes) -> Codes:
    magic, n, d, bits = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ValueError("not a BTR blob")
    body = memoryview(blob)[_HEADER.size:]
    if bits == FLOAT_BITS:
        return Codes(n, d, bits, states=np.frombuffer(body, "<f2").reshape(n, d).astype(np.float16))
    width = (d + 7) // 8
    plane_bytes = bits * n * width
    planes = np.frombuffer(body[:plane_bytes], np.uint8).reshape(bits, n, width)
    scales = np.frombuffer(body[plane_bytes:], "<f2").reshape(n).astype(np.float16)
    return Codes(n, d, bits, planes=planes, scales=scales)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed codes a [m, w] and b [n, w] -> [m, n] int."""
    xor = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.bitwise_count(xor).sum(axis=-1, dtype=np.int32)  # popcount per byte: no 8x unpacked copy


def fp16_kv_bytes_per_token(config) -> int:
    """What one token costs in an fp16 KV cache of every layer: the baseline BTR's storage is compared to."""
    _, kv_heads, head_dim = head_shape(config)
    return config.num_hidden_layers * 2 * kv_heads * head_dim * 2


def fp16_state_bytes_per_token(config) -> int:
    return config.hidden_size * 2
