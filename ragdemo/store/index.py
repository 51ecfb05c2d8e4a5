"""FAISS indexes: derived data, rebuilt from SQLite whenever missing or out of step with it."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import faiss
import numpy as np

from .db import Store


class ChunkIndex:
    """Exact L2 search over unit vectors (L2 order = cosine order), keyed by chunk id."""

    def __init__(self, index: faiss.Index, signature: str):
        self.index, self.signature = index, signature

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, chunk ids), each [n_queries, k']; k' = min(k, size)."""
        k = min(k, self.index.ntotal)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


class IndexCache:
    """One ChunkIndex per (collection, embedder), checked against SQLite's signature on every use."""

    def __init__(self, store: Store):
        self.store = store
        self.folder = store.home / "faiss"
        self.folder.mkdir(exist_ok=True)
        self._memory: dict[tuple[int, str], ChunkIndex] = {}
        self._lock = threading.Lock()
        self.rebuilds = 0

    def path(self, collection_id: int, embedder: str) -> Path:
        return self.folder / f"c{collection_id}-{_slug(embedder)}.faiss"

    def get(self, collection_id: int, embedder: str) -> ChunkIndex:
        signature = self.store.vector_signature(collection_id, embedder)
        key = (collection_id, embedder)
        with self._lock:
            cached = self._memory.get(key)
            if cached is not None and cached.signature == signature and self.path(*key).exists():
                return cached
            index = self._read(key, signature) or self._rebuild(key, signature)
            self._memory[key] = index
            return index

    def _read(self, key, signature: str) -> ChunkIndex | None:
        path = self.path(*key)
        meta = path.with_suffix(".json")
        try:
            if json.loads(meta.read_text())["signature"] != signature:
                return None
            return ChunkIndex(faiss.read_index(str(path)), signature)
        except (OSError, ValueError, KeyError, RuntimeError):
            return None

    def _rebuild(self, key, signature: str) -> ChunkIndex:
        ids, matrix = self.store.vectors(*key)
        dim = matrix.shape[1] if matrix.size else 1
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        if len(ids):
            index.add_with_ids(matrix, ids)
        path = self.path(*key)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)  # the signature is written after the index, so a crash in between only forces a rebuild
        path.with_suffix(".json").write_text(json.dumps({"signature": signature, "n": int(len(ids))}))
        self.rebuilds += 1
        return ChunkIndex(index, signature)
