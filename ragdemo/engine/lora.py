"""LoRA adapters on a shared LM: train with peft, store as safetensors bytes, apply and remove without a trace.

The LM object is shared by every method, so an adapter must never leak: training injects peft layers and
always unloads them (restoring requires_grad too); answering merges the low-rank update into the weights and
puts the exact original tensors back afterwards, so the base model is bit-for-bit what it was.
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # what LLoCO adapted (r=8)


@contextmanager
def trainable_lora(lm, r: int = 8, alpha: int = 16, targets=ATTENTION_TARGETS, dropout: float = 0.0):
    """Inject peft LoRA layers into `lm.model` in place; yields the trainable parameters; always unloads."""
    from peft import LoraConfig, get_peft_model

    grad_flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    peft_model = get_peft_model(lm.model, config)
    was_training = lm.model.training
    try:
        lm.model.train()
        yield peft_model
    finally:
        peft_model.base_model.unload()  # replaces every LoRA layer by its untouched base Linear
        lm.model.train(was_training)
        for name, p in lm.model.named_parameters():
            p.requires_grad_(grad_flags.get(name, p.requires_grad))


def adapter_bytes(peft_model, r: int, alpha: int, meta: dict | None = None) -> bytes:
    """The LoRA A/B matrices keyed by the base module's path in the plain model (e.g. model.layers.0.self_attn.q_proj)."""
    tensors = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            tensors[f"{name}.lora_A"] = module.lora_A["default"].weight.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_B"] = module.lora_B["default"].weight.detach().float().contiguous().cpu()
    info = {"r": str(r), "alpha": str(alpha), **{k: str(v) for k, v in (meta or {}).items()}}
    return save_tensors(tensors, metadata=info)


def adapter_meta(blob: bytes) -> dict:
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + size]).get("__metadata__", {})


@contextmanager
def applied_adapter(lm, blob: bytes | None):
    """Merge W += (alpha/r)·B·A into the target weights for the duration; restore the exact originals after."""
    if not blob:
        yield
        return
    tensors = load_tensors(blob)
    meta = adapter_meta(blob)
    scale = float(meta["alpha"]) / float(meta["r"])
    modules = dict(lm.model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for key in tensors:
                if not key.endswith(".lora_A"):
                    continue
                name = key[: -len(".lora_A")]
                weight = modules[name].weight
                saved[name] = weight.detach().clone()
                delta = (tensors[f"{name}.lora_B"] @ tensors[key]) * scale
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)
