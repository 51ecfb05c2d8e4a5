"""FAISS indexes: derived data, rebuilt from SQLite whenever missing or out of step with it.

Two retrievers per collection: `float` (exact L2 over the unit embeddings: SQLite stores them as float16, so the
index keeps them as float16 too, losslessly, and scans half the bytes of float32) and `binary` (1-bit sign codes,
d/8 bytes per chunk, searched by Hamming distance, then the top k x rescore candidates re-ranked by exact L2
with the float vectors SQLite stores anyway: binary quantisation with rescoring, as in BTR's 1-bit idea carried
over to retrieval)."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from ..caching import kept_while
from ..forks import renew_in_forked_children
from .db import Store

KINDS = ("float", "binary")
FORMATS = {"float": "fp16-l2", "binary": "sign-hamming"}  # what an index file holds; another format is rebuilt


def sign_codes(vectors: np.ndarray) -> np.ndarray:
    """[n, d] floats -> [n, d/8] uint8: one bit per dimension, set where the coordinate is positive."""
    return np.packbits(np.asarray(vectors) > 0, axis=-1)


class ChunkIndex:
    """Exact L2 search over unit vectors (L2 order = cosine order), keyed by chunk id. Distances are computed in
    float32 from the float16 vectors SQLite holds."""

    kind = "float"

    def __init__(self, index: faiss.Index, signature: str):
        self.index, self.signature = index, signature

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def nbytes(self) -> int:
        """Bytes of the searched vectors (the chunk-id map, 8 bytes per chunk, comes on top: `id_bytes`)."""
        return self.index.ntotal * faiss.downcast_index(self.index.index).code_size

    @property
    def float32_bytes(self) -> int:
        """The same vectors as float32, the usual yardstick for binary quantisation's 32x."""
        return self.index.ntotal * self.index.d * 4

    @property
    def id_bytes(self) -> int:
        return self.index.ntotal * 8

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, chunk ids), each [n_queries, k']; k' = min(k, size)."""
        k = min(k, self.index.ntotal)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class BinaryChunkIndex:
    """Hamming search over sign codes, then exact L2 rescoring of the best k x rescore candidates with the
    stored float vectors, fetched by chunk id (only the candidates are read, never the whole matrix)."""

    kind = "binary"

    def __init__(self, index: faiss.IndexBinary, signature: str, float_vectors: Callable[[list[int]], np.ndarray]):
        self.index, self.signature, self.float_vectors = index, signature, float_vectors

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def nbytes(self) -> int:
        return self.index.ntotal * self.index.code_size

    @property
    def id_bytes(self) -> int:
        return self.index.ntotal * 8

    def hamming_search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distances, chunk ids) of the n nearest sign codes per query."""
        n = min(n, self.index.ntotal)
        if n == 0:
            return np.zeros((len(queries), 0), np.int32), np.zeros((len(queries), 0), np.int64)
        return self.index.search(sign_codes(queries), n)

    def search(self, queries: np.ndarray, k: int, rescore: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, chunk ids) like ChunkIndex.search, over the Hamming candidates only."""
        k = min(k, self.index.ntotal)
        _, candidates = self.hamming_search(queries, k * max(1, rescore))
        distances = np.zeros((len(queries), k), np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for row, (query, found) in enumerate(zip(np.asarray(queries, np.float32), candidates)):
            found = found[found >= 0]
            exact = ((self.float_vectors(found.tolist()) - query) ** 2).sum(axis=1)
            best = np.argsort(exact, kind="stable")[:k]
            distances[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return distances, ids


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


class IndexCache:
    """One index per (collection, embedder, kind). Every use reads the collection's (uid, version), one
    primary-key lookup; only when that moved is the content signature computed (a pass over the collection's
    vector rows) and the file on disk checked against it, then read or rebuilt."""

    def __init__(self, store: Store):
        self.store = store
        self.folder = store.home / "faiss"
        self.folder.mkdir(exist_ok=True)
        # both kept with the collection's (uid, version) they were checked against (`kept_while`)
        self._memory: dict[tuple[int, str, str], tuple[tuple, ChunkIndex | BinaryChunkIndex]] = {}
        self._signatures: dict[tuple[int, str], tuple[tuple, str]] = {}  # (collection, embedder) -> (stamp, signature)
        self._lock = threading.Lock()
        renew_in_forked_children(self)
        self.rebuilds = 0
        self.signature_scans = 0

    def renew_after_fork(self) -> None:
        self._lock = threading.Lock()

    def path(self, collection_id: int, embedder: str, kind: str = "float") -> Path:
        suffix = "" if kind == "float" else f"-{kind}"
        return self.folder / f"c{collection_id}-{_slug(embedder)}{suffix}.faiss"

    def get(self, collection_id: int, embedder: str, kind: str = "float") -> ChunkIndex | BinaryChunkIndex:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        state = self.store.collection_state(collection_id)
        stamp = (state["uid"], state["version"])
        key = (collection_id, embedder, kind)
        with self._lock:
            return kept_while(self._memory, key, stamp, lambda: self._load(key, stamp))

    def _load(self, key, stamp: tuple):
        signature = self._signature(key[0], key[1], stamp)
        return self._read(key, signature) or self._rebuild(key, signature)

    def _signature(self, collection_id: int, embedder: str, stamp: tuple) -> str:
        """The content signature, computed once per collection version and shared by both kinds."""
        return kept_while(self._signatures, (collection_id, embedder), stamp,
                          lambda: self._scan_signature(collection_id, embedder))

    def _scan_signature(self, collection_id: int, embedder: str) -> str:
        signature = self.store.vector_signature(collection_id, embedder)
        self.signature_scans += 1
        return signature

    def _wrap(self, key, index, signature: str):
        if key[2] == "binary":
            return BinaryChunkIndex(index, signature, lambda ids, e=key[1]: self.store.vectors_by_id(ids, e))
        return ChunkIndex(index, signature)

    def _read(self, key, signature: str):
        path = self.path(*key)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            if meta["signature"] != signature or meta.get("format") != FORMATS[key[2]]:
                return None
            read = faiss.read_index_binary if key[2] == "binary" else faiss.read_index
            return self._wrap(key, read(str(path)), signature)
        except (OSError, ValueError, KeyError, RuntimeError):
            return None

    def _rebuild(self, key, signature: str):
        ids, matrix = self.store.vectors(*key[:2])
        dim = matrix.shape[1] if matrix.size else 8
        if key[2] == "binary":
            index, write = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(dim)), faiss.write_index_binary
            rows = sign_codes(matrix)
        else:
            lossless = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
            index, write = faiss.IndexIDMap2(lossless), faiss.write_index
            rows = matrix
        if len(ids):
            index.add_with_ids(rows, ids)
        path = self.path(*key)
        tmp = path.with_suffix(".tmp")
        write(index, str(tmp))
        os.replace(tmp, path)  # the signature is written after the index, so a crash in between only forces a rebuild
        path.with_suffix(".json").write_text(json.dumps({"signature": signature, "format": FORMATS[key[2]],
                                                         "n": int(len(ids))}))
        self.rebuilds += 1
        return self._wrap(key, index, signature)
