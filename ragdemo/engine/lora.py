"""LoRA adapters on a shared LM: train with peft, store as safetensors bytes, switch on and off without a trace.

The LM object is shared by every method, so an adapter must never leak: training injects peft layers into a
private copy of the module tree (`private_lm`: same weight storage, its own modules), so answers that run
between two training steps (the job hands the model over per step, models/lock.py) see the base model. Answering never rewrites a weight: each collection's
adapter is loaded once into `lm.adapters` (an `AdapterCache`, keyed by the blob's content hash) as ready-made
replacements of the adapted projections, and switching it on or off swaps references (~1 ms for 120
projections, against ~35 ms to merge into the weights and restore them). Off, every module is the original
object again, so the base model is bit-for-bit what it was.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..hashing import sha256
from ..models.attention import sdpa_for_training
from ..models.packed import PackedLinear, is_linear, packed_weight, share_pack
from ..params import knob
from ..units import fmt_bytes
from .layers import CAUSAL, embed, logits, positions, run_layers
from .memo import BoundedCache, lm_owned
from .prompt import encode, question_ids
from .safetensors_meta import safetensors_metadata

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # what LLoCO adapted (r=8)


@dataclass
class LoraKnobs:
    """The knobs of a method that can train a per-collection adapter (mixed into its Params)."""

    lora: bool = knob(True, "use the collection's adapter when one has been trained", label="use LoRA")
    train: bool = knob(False, "prepare also trains the collection's adapter when it is missing (as `finetune` does)",
                       label="train LoRA")
    lora_r: int = knob(8, "rank of the adapter's low-rank matrices", label="LoRA rank", min=1, max=256)
    lora_steps: int = knob(300, "training steps of the adapter", label="LoRA steps", min=1, max=20000)
    lora_lr: float = knob(5e-4, "learning rate of the adapter", label="LoRA learning rate", above=0, max=1)


@dataclass
class Training:
    blob: bytes
    losses: list[float]
    seconds: float

    def summary(self, what: str) -> str:
        first = sum(self.losses[:20]) / len(self.losses[:20])
        last = sum(self.losses[-20:]) / len(self.losses[-20:])
        return (f"{what}, {len(self.losses)} steps in {self.seconds:.0f}s: loss {first:.3f} -> {last:.3f}; "
                f"{fmt_bytes(len(self.blob))} stored")


@contextmanager
def trainable_lora(lm, r: int = 8, alpha: int = 16, targets=ATTENTION_TARGETS, dropout: float = 0.0,
                   layers: list[int] | None = None):
    """Inject peft LoRA layers into `lm.model` in place (only in `layers` when given); yields the peft model;
    always unloads."""
    from peft import LoraConfig, get_peft_model

    grad_flags = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none",
                        layers_to_transform=list(layers) if layers is not None else None)
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


def private_lm(lm):
    """The LM over its own copy of the module tree that shares every weight's and buffer's storage: peft can inject
    LoRA layers into it and switch it to train mode without touching the shared model. Costs the module objects
    only (no weight is copied). The copy must be made while no adapter is switched on (callers hold `lm.lock`)."""
    memo = {}
    for weight in lm.model.parameters():
        # a fresh Parameter over the same storage, so peft's requires_grad changes stay private too; other
        # parameter types (bitsandbytes' quantized weights) carry quantisation state and are shared as they are
        if type(weight) is torch.nn.Parameter:
            memo[id(weight)] = torch.nn.Parameter(weight.detach(), requires_grad=False)
            share_pack(weight, memo[id(weight)])  # same storage, same values: its no-grad teacher runs reuse the pack
        else:
            memo[id(weight)] = weight
    for buffer in lm.model.buffers():
        memo[id(buffer)] = buffer
    # no prefix or adapter cache: nothing computed by the model in training may be served to an answer
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model, memo), prefix_cache=None, adapters=None)


def train_adapter(lm, loss_of_step, knobs: LoraKnobs, progress=None, layers: list[int] | None = None,
                  meta: dict | None = None, extra: list[torch.nn.Parameter] = ()) -> Training:
    """The one LoRA training loop: AdamW, clipped gradients, seeded. It trains on `private_lm(lm)`:
    `loss_of_step(peft_model, student)` builds one example and returns its loss, running the model through
    `student` (the private LM, adapter in; `peft_model.disable_adapter()` switches it off for a teacher).
    `extra` parameters (e.g. a trainable decoder) learn jointly with the LoRA in the same optimizer; the
    caller owns and stores them. `progress(fraction, message)` after every step: the shared model is untouched
    there."""
    torch.manual_seed(0)
    started, losses = time.perf_counter(), []
    student = private_lm(lm)
    sdpa_for_training(student.model)
    with trainable_lora(student, r=knobs.lora_r, alpha=2 * knobs.lora_r, layers=layers) as peft_model:
        trainable = [p for p in peft_model.parameters() if p.requires_grad] + list(extra)
        optimizer = torch.optim.AdamW(trainable, lr=knobs.lora_lr, weight_decay=0.0)
        for step in range(knobs.lora_steps):
            loss = loss_of_step(peft_model, student)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if progress:
                recent = sum(losses[-20:]) / len(losses[-20:])
                progress((step + 1) / knobs.lora_steps, f"LoRA step {step + 1}/{knobs.lora_steps}, loss {recent:.3f}")
        blob = adapter_bytes(peft_model, knobs.lora_r, 2 * knobs.lora_r, {"steps": knobs.lora_steps, **(meta or {})})
    return Training(blob, losses, time.perf_counter() - started)


def cloze_question(tokenizer, chunks: list[dict], n_passages: int, rng: random.Random):
    """A training question about the collection's own text: a target chunk among n_passages-1 random
    distractors (document order), "What comes right after <5-10 quoted tokens> in the context?", and the
    next 6-12 tokens of the chunk as the answer. Returns (chunks, question text, answer ids)."""
    target_chunk = rng.choice(chunks)
    others = rng.sample([c for c in chunks if c["chunk_id"] != target_chunk["chunk_id"]],
                        min(n_passages - 1, len(chunks) - 1))
    picked = sorted([target_chunk, *others], key=lambda c: (c["doc_id"], c["ord"]))
    ids = encode(tokenizer, target_chunk["text"].strip())
    span, answer = rng.randint(5, 10), rng.randint(6, 12)
    start = rng.randint(0, max(0, len(ids) - span - answer))
    quote = tokenizer.decode(ids[start:start + span]).strip()
    return picked, f"What comes right after \"{quote}\" in the context?", ids[start + span:start + span + answer]


def cloze_example(tokenizer, chunks: list[dict], n_passages: int, rng: random.Random):
    """`cloze_question` with the question as a prompt's final question segment: (chunks, question ids, answer ids)."""
    picked, question, answer = cloze_question(tokenizer, chunks, n_passages, rng)
    return picked, question_ids(tokenizer, question), answer


def teacher_logits(lm, teacher_off, prefix_ids: list[int], passage_ids: list[list[int]], query_ids: list[int],
                   lead_ids: list[int] = ()):
    """The full model reading the passages as plain text (what RAG sees), at every query-side position;
    `lead_ids` (a question copy before the passages) for layouts that have one. `teacher_off()` is a context in
    which the adapter being trained is switched off."""
    return teacher_run(lm, teacher_off, prefix_ids, passage_ids, query_ids, lead_ids)[0]


def teacher_run(lm, teacher_off, prefix_ids: list[int], passage_ids: list[list[int]], query_ids: list[int],
                lead_ids: list[int] = (), keep_layers: range = range(0)) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """`teacher_logits`, plus what state-level distillation needs: {layer: that layer's input states} for
    `keep_layers`, and the last layer's output [1, n, d]; one forward, layer by layer."""
    full = prefix_ids + list(lead_ids) + [i for ids in passage_ids for i in ids] + query_ids
    with torch.no_grad(), teacher_off():
        h = embed(lm, torch.tensor([full], device=lm.device))
        pos = positions(0, len(full), lm.device)
        inputs = {}
        for layer in range(lm.n_layers):
            if layer in keep_layers:
                inputs[layer] = h
            h = run_layers(lm, h, layer, layer + 1, pos, CAUSAL)
        return logits(lm, h[:, -len(query_ids):])[0].float(), inputs, h


def salient_tokens(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ceil(fraction x n) highest `scores` (ties: the earlier token), in token order."""
    count = min(len(scores), max(1, math.ceil(fraction * len(scores))))
    return torch.sort(torch.argsort(-scores, stable=True)[:count]).values


def relative_mse(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error over the target's variance around its mean token: scale-free, so one weight suits every
    model and layer, and the few huge near-constant channels of LLM states do not swamp it."""
    target = target.float()
    spread = ((target - target.mean(dim=0, keepdim=True)) ** 2).mean().clamp_min(1e-12)
    return ((predicted.float() - target) ** 2).mean() / spread


def distill_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged: the student learns to read its cached/compressed context
    the way the full model reads the text."""
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="batchmean")


def adapter_key(content_signature: str) -> str:
    """Adapters are stored per collection content (the store's content signature), never per collection id:
    SQLite reuses deleted ids, and an adapter trained on other text must never be applied."""
    return f"lora:{content_signature}"


def adapter_bytes(peft_model, r: int, alpha: int, meta: dict | None = None) -> bytes:
    """The LoRA A/B matrices keyed by the base module's path in the plain model (e.g. model.layers.0.self_attn.q_proj)."""
    tensors = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            tensors[f"{name}.lora_A"] = module.lora_A["default"].weight.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_B"] = module.lora_B["default"].weight.detach().float().contiguous().cpu()
    info = {"r": str(r), "alpha": str(alpha), **{k: str(v) for k, v in (meta or {}).items()}}
    return save_tensors(tensors, metadata=info)


class LoadedAdapter:
    """One adapter ready to switch: for each adapted projection, the object to put in place and the original.

    Plain float Linear weights get a merged copy, W + (alpha/r)·B·A, computed once in fp32 exactly as a merge
    would, and swapped in as the module's `weight` (no extra work per forward). Quantized weights (bitsandbytes
    4/8-bit) cannot be merged: the module itself is swapped for peft's own LoRA layer around it."""

    def __init__(self, lm, blob: bytes):
        tensors = load_tensors(blob)
        meta = safetensors_metadata(blob)
        r, alpha = int(meta["r"]), float(meta["alpha"])
        modules = dict(lm.model.named_modules())
        self.swaps: list[tuple[torch.nn.Module, str, object, object]] = []  # (owner, attribute, adapted, original)
        self.nbytes = 0
        for key in tensors:
            if key.endswith(".lora_A"):
                name = key[: -len(".lora_A")]
                self.swaps.append(self._swap(lm, modules, name, tensors[key], tensors[f"{name}.lora_B"], r, alpha))

    def _swap(self, lm, modules, name, a, b, r, alpha):
        module = modules[name]
        if is_linear(module) and module.weight.dtype.is_floating_point:
            with torch.no_grad():
                weight = module.weight
                merged = (weight.float() + ((b @ a) * (alpha / r)).to(weight.device)).to(weight.dtype)
            merged = torch.nn.Parameter(merged, requires_grad=False)
            self.nbytes += merged.nbytes
            if isinstance(module, PackedLinear):  # packed now, with the adapter's load, not in an answer
                packed_weight(merged)
                self.nbytes += merged.nbytes
            return module, "weight", merged, weight
        owner_name, _, attribute = name.rpartition(".")
        layer = _peft_layer(lm, module, a, b, r, alpha)
        self.nbytes += a.nbytes + b.nbytes
        return modules[owner_name], attribute, layer, module

    def switch(self, on: bool) -> None:
        for owner, attribute, adapted, original in self.swaps:
            setattr(owner, attribute, adapted if on else original)


def _peft_layer(lm, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, r: int, alpha: float):
    """peft's LoRA layer for this kind of base module (its dispatch picks the bitsandbytes variants)."""
    from peft import LoraConfig
    from peft.tuners.lora.model import LoraModel

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none")
    layer = LoraModel._create_new_module(config, "collection", base, r=r, lora_alpha=alpha, lora_dropout=0.0,
                                         loaded_in_4bit=getattr(lm.model, "is_loaded_in_4bit", False),
                                         loaded_in_8bit=getattr(lm.model, "is_loaded_in_8bit", False))
    device = a.device if not hasattr(base, "weight") else base.weight.device
    with torch.no_grad():
        layer.lora_A["collection"].weight.copy_(a.to(device))
        layer.lora_B["collection"].weight.copy_(b.to(device))
    layer.requires_grad_(False)
    return layer.eval()


class AdapterCache:
    """The adapters loaded for one LM, keyed by the blob's content hash and bounded in bytes (least recently
    used first out), plus which one is switched on (`active`: its hash, or None for the base model)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.items = BoundedCache(max_bytes, lambda adapter: adapter.nbytes)
        self.active: str | None = None

    def get(self, lm, adapter) -> tuple[str, LoadedAdapter]:
        """(its key in this cache, the loaded adapter) for a blob (keyed by its hash) or a stored reference
        (keyed by the artifact's identity, read only when not loaded yet)."""
        self.items.keep_for(id(lm.model))  # another model object: nothing loaded for the old one applies
        if isinstance(adapter, (bytes, bytearray)):
            digest, read = sha256(adapter), lambda: adapter
        else:
            digest, read = sha256(repr(adapter.identity).encode()), adapter.read
        return digest, self.items.get(digest, lambda: LoadedAdapter(lm, read()))


def adapter_cache(lm) -> AdapterCache:
    """The LM's adapter cache, made on first use; it lives and dies with the LM object."""
    return lm_owned(lm, "adapters", AdapterCache)


@contextmanager
def applied_adapter(lm, adapter):
    """The collection's adapter switched on for the duration (loaded once), then off again. `adapter` is its
    blob, or a stored reference (`identity`, `read()`: the store's StoredArtifact), which answers use so that
    an adapter already loaded is neither read from the store nor hashed again."""
    if not adapter:
        yield
        return
    cache = adapter_cache(lm)
    if cache.active is not None:
        raise RuntimeError("an adapter is already switched on for this model")  # callers hold lm.lock; never nest
    digest, adapter = cache.get(lm, adapter)
    adapter.switch(True)
    cache.active = digest
    try:
        yield
    finally:
        adapter.switch(False)
        cache.active = None
