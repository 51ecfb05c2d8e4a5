"""Linear layers with their weights pre-packed for oneDNN on the CPU.

`F.linear` re-lays-out the weight into oneDNN's blocked format on every bf16 call, and fp32 goes through MKL,
which runs slowly on AMD CPUs. For the few-row matmuls that dominate decode steps and short prefills (a
question after a cached context), streaming the weights is the whole cost, so the per-call reorder is a large
share: packing once at load makes them 1.2-1.4x faster in bf16 (bit-identical results, the same kernel) and
2-4x faster in fp32 on the AMD EPYC these benches ran on. A probe at load decides, per dtype, and says why.

The pack is cached on the weight Parameter itself (with its version counter), so a LoRA that swaps in a merged
weight carries its own pack, and an in-place write to a weight re-packs it instead of serving stale values.
Anything that records autograd (LoRA training) takes plain `F.linear`: packed weights have no backward.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..caching import kept_while
from .probe import best_seconds

PACK_ATTRIBUTE = "_ragdemo_onednn"  # on the weight Parameter: (its version when packed, the packed tensor)
MIN_SPEEDUP = 1.1  # the probe's few-row matmul must be this much faster packed, or nothing is packed
MAX_RAM_SHARE = 0.25  # the packed copies may take at most this share of the machine's memory


@functools.cache
def onednn_available() -> bool:
    """A fact of this torch build, looked up once (it is asked on every projection)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's layout, made once per Parameter and again only after an in-place write."""
    def pack():
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    return cached_on(weight, PACK_ATTRIBUTE, pack)


def cached_on(tensor: torch.Tensor, attribute: str, make):
    """`make()`, kept on `tensor` itself under `attribute` with the tensor's version: it lives and dies with the
    tensor, and an in-place write to the tensor makes it again instead of serving a stale value."""
    return kept_while(tensor.__dict__, attribute, tensor_version(tensor), make)


def tensor_version(tensor: torch.Tensor) -> int:
    """Its in-place write counter, what keys anything cached on a tensor. One made under inference mode (a LoRA
    merged during an answer, a mask built in one) has none; nothing in ragdemo writes into one, so what is
    cached on it is kept for its lifetime."""
    return -1 if tensor.is_inference() else tensor._version


def share_pack(source: torch.Tensor, target: torch.Tensor) -> None:
    """Give `target` (a new Parameter over the same storage, e.g. a private copy of the model) `source`'s pack."""
    if PACK_ATTRIBUTE in source.__dict__:
        target.__dict__[PACK_ATTRIBUTE] = source.__dict__[PACK_ATTRIBUTE]


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN with the weight's pack, unconditionally (the probes time exactly this)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


def activation_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T where `weight` is an activation (attention's keys), so nothing is packed: oneDNN's kernel
    where this torch has it (fp32 through F.linear is MKL's, several times slower on AMD CPUs)."""
    if not onednn_available() or x.device.type != "cpu":
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through the packed weight where it can be (a CPU tensor of the weight's dtype, nothing to
    record for autograd, a torch with oneDNN); `weight` must be a long-lived tensor, since its pack lives on it."""
    if (x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype or x.dim() < 2
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or not onednn_available()):
        return F.linear(x, weight, bias)
    return packed_linear(x, weight, bias)


class PackedLinear(torch.nn.Linear):
    """nn.Linear whose inference forward uses the packed weight; same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def plain_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """Exactly nn.Linear (not bitsandbytes' or peft's subclasses, which carry their own weights and forward)."""
    return [m for m in module.modules() if type(m) is torch.nn.Linear]


def is_linear(module: torch.nn.Module) -> bool:
    """A plain float projection, packed or not: what may be merged into or swapped."""
    return type(module) in (torch.nn.Linear, PackedLinear)


@dataclass(frozen=True)
class Packing:
    """Whether the model's projections are packed, and why: shown in Settings and by bench-speed."""

    packed: bool
    reason: str
    extra_bytes: int = 0


def probe_speedup(dtype: torch.dtype, rows: int = 16, shape: tuple[int, int] = (1536, 576), rounds: int = 5) -> float:
    """Plain over packed time of a few-row matmul at a small LM's MLP shape."""
    weight = torch.nn.Parameter(torch.randn(*shape).to(dtype), requires_grad=False)
    x = torch.randn(rows, shape[1]).to(dtype)
    best = best_seconds({"plain": lambda: F.linear(x, weight), "packed": lambda: packed_linear(x, weight)}, (),
                        rounds, reps=20)
    return best["plain"] / best["packed"]


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def pack_model(model: torch.nn.Module, dtype: torch.dtype) -> Packing:
    """Pack every plain projection of a CPU model in place when the probe says it pays; returns why or why not."""
    if not onednn_available():
        return Packing(False, "weights not packed: this torch build has no oneDNN")
    if dtype not in (torch.float32, torch.bfloat16):
        return Packing(False, f"weights not packed: oneDNN packing is used for fp32 and bf16 only, not {dtype}")
    linears = plain_linears(model)
    extra = sum(m.weight.nbytes for m in linears)
    if physical_memory() and extra > MAX_RAM_SHARE * physical_memory():
        return Packing(False, f"weights not packed: the packed copies would take {extra / 1e6:.0f} MB, over "
                              f"{MAX_RAM_SHARE:.0%} of this machine's memory")
    speedup = probe_speedup(dtype)
    name = str(dtype).replace("torch.", "")
    if speedup < MIN_SPEEDUP:
        said = f"{speedup:.2f}x faster than" if speedup >= 1 else f"{1 / speedup:.2f}x slower than"  # no bare 0.96x
        return Packing(False, f"weights not packed: a packed few-row {name} matmul is {said} a plain one on this "
                              f"CPU (probe; {MIN_SPEEDUP}x faster needed)")
    for module in linears:
        module.__class__ = PackedLinear
        packed_weight(module.weight)  # at load, so no answer pays for it
    return Packing(True, f"weights pre-packed for oneDNN: a few-row {name} matmul {speedup:.1f}x faster (probe), "
                         f"+{extra / 1e6:.0f} MB", extra)

