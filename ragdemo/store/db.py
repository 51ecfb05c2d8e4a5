"""SQLite (through sqlite-utils, WAL mode) holds everything; FAISS indexes are derived from it.

`Store` is the one handle on the file: connection, transactions, collections, documents, chunks and vectors here;
the schema (store/schema.py), artifacts and the storage account (store/artifacts.py) and the History of answers
(store/runs.py) are mixins it inherits, so every caller still holds one `Store`.
"""
from __future__ import annotations

import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sqlite_utils

from ..caching import kept_while
from ..errors import UserError
from ..forks import renew_in_forked_children
from ..hashing import artifact_hash, sha256
from ..params import Spec, checked
from .artifacts import ArtifactRow, ArtifactsMixin, StaleContent, StoredArtifact, chunk_key
from .runs import RunsMixin
from .schema import DEFAULT_RESCORE, SCHEMA_VERSION, SchemaMixin

__all__ = ["Store", "RETRIEVERS", "RESCORE", "COLLECTION_NAME", "check_collection_name", "DEFAULT_RESCORE",
           "SCHEMA_VERSION", "sha256", "artifact_hash", "chunk_key", "StaleContent", "StoredArtifact", "ArtifactRow"]

RETRIEVERS = ("float", "binary")
RESCORE = Spec(int, "the binary retriever rescores the top k x rescore candidates with the float vectors",
               label="rescore", min=1, max=1000)
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


def check_collection_name(name: str) -> str:
    name = (name or "").strip()
    if not COLLECTION_NAME.match(name):
        raise UserError(
            f"invalid collection name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit"
        )
    return name


class Store(SchemaMixin, ArtifactsMixin, RunsMixin):
    """One SQLite file under the data directory. All writes are transactions, so a killed process never
    leaves half a document or half an artifact behind."""

    def __init__(self, home: Path | str):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "ragdemo.db"
        self._connect()
        self.db.enable_wal()
        # answers read the content signature and the storage account; both are remembered until the collection's
        # version or the artifact counter moves (one primary-key read), instead of a scan of the collection each
        self._remembered: dict[tuple, tuple[tuple, object]] = {}
        self._create_schema()
        renew_in_forked_children(self)

    def _connect(self) -> None:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.lock = threading.RLock()

    def renew_after_fork(self) -> None:
        """A forked child (a ZeroGPU worker) opens its own connection; the parent's is left alone, never closed
        from here (SQLite: a connection must not be used across a fork)."""
        self._connect()

    def _remembered_value(self, key: tuple, collection_id: int, with_artifacts: bool, compute):
        """`compute()` once per state of the collection (its uid and version, and with `with_artifacts` the
        artifact counter). Inside a transaction, where this connection may see its own half-written rows, it is
        computed afresh and not kept."""
        with self.lock:
            if self.db.conn.in_transaction:
                return compute()
            found = self.db.execute("""SELECT c.uid, c.version, (SELECT artifacts FROM changes WHERE id = 0)
                                       FROM collections c WHERE c.id = ?""", (collection_id,)).fetchone()
            if found is None:
                return compute()
            stamp = tuple(found) if with_artifacts else tuple(found[:2])
            return kept_while(self._remembered, key, stamp, compute)

    @contextmanager
    def transaction(self):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def rows(self, sql: str, params=()) -> list[dict]:
        with self.lock:
            cursor = self.db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def value(self, sql: str, params=()):
        with self.lock:
            row = self.db.execute(sql, params).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------- collections
    def collection_id(self, name: str, create: bool = True) -> int:
        name = check_collection_name(name)
        found = self.value("SELECT id FROM collections WHERE name = ?", (name,))
        if found is not None:
            return int(found)
        if not create:
            raise UserError(f"no collection named {name!r}; ingest documents into it first")
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO collections (name, created, uid) VALUES (?, ?, lower(hex(randomblob(16))))",
                            (name, time.time()))
        return int(self.value("SELECT id FROM collections WHERE name = ?", (name,)))

    def rename_collection(self, name: str, new_name: str) -> None:
        collection_id, new_name = self.collection_id(name, create=False), check_collection_name(new_name)
        if self.value("SELECT id FROM collections WHERE name = ?", (new_name,)) is not None:
            raise UserError(f"a collection named {new_name!r} already exists")
        with self.transaction():
            self.db.execute("UPDATE collections SET name = ? WHERE id = ?", (new_name, collection_id))

    def delete_collection(self, name: str) -> int:
        """The collection, its documents, chunks, vectors and artifacts (cascades); runs keep their text."""
        collection_id = self.collection_id(name, create=False)
        self.drop_collection(collection_id)
        return collection_id

    def drop_collection(self, collection_id: int) -> None:
        """The collection with this id and, by cascade, its documents, chunks, vectors and artifacts."""
        with self.transaction():
            self.db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))

    def collection_state(self, collection_id: int) -> dict:
        """{uid, version, retriever, rescore}: one primary-key read, cheap enough for every retrieval."""
        found = self.rows("SELECT uid, version, retriever, rescore FROM collections WHERE id = ?", (collection_id,))
        if not found:
            raise UserError(f"collection {collection_id} no longer exists")
        return found[0]

    def set_retrieval(self, collection_id: int, retriever: str | None = None, rescore: int | None = None) -> dict:
        """Choose the collection's retriever (float | binary) and the binary path's rescoring factor."""
        if retriever is not None and retriever not in RETRIEVERS:
            raise UserError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")
        if rescore is not None:
            rescore = checked(RESCORE, "rescore", rescore)
        with self.transaction():
            self.db.execute("UPDATE collections SET retriever = COALESCE(?, retriever), rescore = COALESCE(?, rescore) "
                            "WHERE id = ?", (retriever, rescore, collection_id))
        return self.collection_state(collection_id)

    def collections(self) -> list[dict]:
        return self.rows("""SELECT c.id, c.name, COUNT(d.id) AS documents, COALESCE(SUM(d.n_tokens), 0) AS tokens
                            FROM collections c LEFT JOIN documents d ON d.collection_id = c.id
                            GROUP BY c.id ORDER BY c.name""")

    # ------------------------------------------------------------ documents
    def find_document(self, collection_id: int, digest: str) -> dict | None:
        found = self.rows("SELECT id, name FROM documents WHERE collection_id = ? AND sha256 = ?", (collection_id, digest))
        return found[0] if found else None

    def add_document(self, collection_id: int, name: str, digest: str, size: int, text: str,
                     chunks: list, vectors: np.ndarray, embedder: str) -> int:
        """Document, chunks and vectors land together or not at all."""
        n_tokens = chunks[-1].tok_end if chunks else 0
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO documents (collection_id, sha256, name, size, n_tokens, text, created) VALUES (?,?,?,?,?,?,?)",
                (collection_id, digest, name, size, n_tokens, text, time.time()))
            doc_id = cursor.lastrowid
            for chunk, vec in zip(chunks, vectors):
                chunk_id = self.db.execute(
                    "INSERT INTO chunks (doc_id, ord, text, tok_start, tok_end, char_start, char_end, sha256) VALUES (?,?,?,?,?,?,?,?)",
                    (doc_id, chunk.ord, chunk.text, chunk.tok_start, chunk.tok_end, chunk.char_start, chunk.char_end,
                     sha256(chunk.text.encode())),
                ).lastrowid
                self.db.execute("INSERT INTO vectors (chunk_id, embedder, dim, vec) VALUES (?,?,?,?)",
                                (chunk_id, embedder, vec.shape[0], vec.astype(np.float16).tobytes()))
        return int(doc_id)

    def documents(self, collection_id: int) -> list[dict]:
        return self.rows("""SELECT d.id, d.name, d.size, d.n_tokens, d.sha256,
                                   (SELECT COUNT(*) FROM chunks c WHERE c.doc_id = d.id) AS n_chunks
                            FROM documents d WHERE d.collection_id = ? ORDER BY d.id""", (collection_id,))

    def has_documents(self, collection_id: int) -> bool:
        """One index probe, not a scan: asked before every answer."""
        return bool(self.value("SELECT EXISTS (SELECT 1 FROM documents WHERE collection_id = ?)", (collection_id,)))

    def collection_tokens(self, collection_id: int) -> int:
        return int(self.value("SELECT COALESCE(SUM(n_tokens), 0) FROM documents WHERE collection_id = ?",
                              (collection_id,)) or 0)

    def content_signature(self, collection_id: int) -> str:
        """Names the collection's content: a hash of its chunks' text hashes, sorted (so neither row ids nor the
        order documents arrived in matter). Collection-level artifacts are keyed by it. It scans the collection's
        chunks, so it is computed once per collection version."""
        return self._remembered_value(("signature", collection_id), collection_id, False,
                                      lambda: self._scan_signature(collection_id))

    def _scan_signature(self, collection_id: int) -> str:
        rows = self.db.execute("""SELECT c.sha256 FROM chunks c JOIN documents d ON d.id = c.doc_id
                                  WHERE d.collection_id = ? ORDER BY c.sha256""", (collection_id,)).fetchall()
        return artifact_hash("|".join(r[0] for r in rows).encode())

    def _signature_now(self, collection_id: int) -> str:
        """The content signature as of this transaction: the remembered one when the collection's (uid, version)
        has not moved since it was computed (one primary-key read), else a fresh scan."""
        found = self.db.execute("SELECT uid, version FROM collections WHERE id = ?", (collection_id,)).fetchone()
        kept = self._remembered.get(("signature", collection_id))
        if found is not None and kept is not None and kept[0] == tuple(found):
            return kept[1]
        return self._scan_signature(collection_id)

    def document_texts(self, collection_id: int) -> list[dict]:
        return self.rows("SELECT id, name, text FROM documents WHERE collection_id = ? ORDER BY id", (collection_id,))

    def resolve_document(self, collection_id: int, ref: str) -> dict:
        """A document by id, exact name or sha256 prefix."""
        if str(ref).isdigit():
            found = self.rows("SELECT id, name FROM documents WHERE collection_id = ? AND id = ?", (collection_id, int(ref)))
        else:
            found = self.rows("SELECT id, name FROM documents WHERE collection_id = ? AND (name = ? OR sha256 LIKE ?)",
                              (collection_id, ref, f"{ref}%" if len(ref) >= 8 else "\u0000"))
        if not found:
            raise UserError(f"no document {ref!r} in this collection (see 'python -m ragdemo list')")
        if len(found) > 1:
            raise UserError(f"{len(found)} documents match {ref!r}; use the document id")
        return found[0]

    def delete_document(self, collection_id: int, ref: str) -> dict:
        doc = self.resolve_document(collection_id, ref)
        with self.transaction():
            self.db.execute("DELETE FROM documents WHERE id = ?", (doc["id"],))
        return doc

    # --------------------------------------------------------------- chunks
    CHUNK_COLUMNS = "c.id AS chunk_id, c.doc_id, d.name AS doc, c.ord, c.text, c.tok_start, c.tok_end, c.char_start, c.char_end"

    def chunks(self, collection_id: int) -> list[dict]:
        return self.rows(f"""SELECT {self.CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.doc_id
                             WHERE d.collection_id = ? ORDER BY c.doc_id, c.ord""", (collection_id,))

    def chunks_by_id(self, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.rows(f"""SELECT {self.CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.doc_id
                             WHERE c.id IN ({marks})""", tuple(int(i) for i in ids))
        return {r["chunk_id"]: r for r in rows}

    def next_chunk(self, chunk: dict) -> dict | None:
        rows = self.rows(f"""SELECT {self.CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.doc_id
                             WHERE c.doc_id = ? AND c.ord = ?""", (chunk["doc_id"], chunk["ord"] + 1))
        return rows[0] if rows else None

    def vectors(self, collection_id: int, embedder: str) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, float32 matrix) of every chunk of the collection embedded by `embedder`."""
        rows = self.rows("""SELECT v.chunk_id, v.dim, v.vec FROM vectors v JOIN chunks c ON c.id = v.chunk_id
                            JOIN documents d ON d.id = c.doc_id WHERE d.collection_id = ? AND v.embedder = ?
                            ORDER BY v.chunk_id""", (collection_id, embedder))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        ids = np.array([r["chunk_id"] for r in rows], dtype=np.int64)
        matrix = np.stack([np.frombuffer(r["vec"], dtype=np.float16) for r in rows]).astype(np.float32)
        return ids, matrix

    def vectors_by_id(self, chunk_ids: list[int], embedder: str) -> np.ndarray:
        """float32 [len(chunk_ids), dim] in the given order: the stored vectors the binary retriever rescores with."""
        if not chunk_ids:
            return np.zeros((0, 0), dtype=np.float32)
        marks = ",".join("?" * len(chunk_ids))
        with self.lock:
            found = dict(self.db.execute(f"SELECT chunk_id, vec FROM vectors WHERE embedder = ? AND chunk_id IN ({marks})",
                                         (embedder, *map(int, chunk_ids))).fetchall())
        return np.stack([np.frombuffer(found[int(i)], dtype=np.float16) for i in chunk_ids]).astype(np.float32)

    def vector_signature(self, collection_id: int, embedder: str) -> str:
        """Changes whenever the set of embedded chunks changes; FAISS files carry it to detect staleness.
        SQLite reuses the ids of deleted rows, so ids alone cannot tell a new collection from a dropped one with
        as many chunks: each document's content hash is part of the signature. It reads every vector row, so
        the index cache computes it only when the collection's version has moved, not per retrieval."""
        rows = self.rows("""SELECT d.id, d.sha256, COUNT(*) AS n, SUM(v.chunk_id) AS s, MAX(v.chunk_id) AS m
                            FROM vectors v JOIN chunks c ON c.id = v.chunk_id JOIN documents d ON d.id = c.doc_id
                            WHERE d.collection_id = ? AND v.embedder = ? GROUP BY d.id ORDER BY d.id""",
                         (collection_id, embedder))
        parts = [f"{r['id']}:{r['sha256']}:{r['n']}:{r['s']}:{r['m']}" for r in rows]
        return f"{sum(r['n'] for r in rows)}-" + sha256("|".join(parts).encode())[:24]

    # ------------------------------------------------------------ integrity
    def integrity_problems(self) -> list[str]:
        problems = []
        if self.value("PRAGMA integrity_check") != "ok":
            problems.append("sqlite integrity_check failed")
        if self.rows("PRAGMA foreign_key_check"):
            problems.append("dangling foreign keys")
        orphans = self.value("""SELECT COUNT(*) FROM documents d WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.doc_id = d.id)
                                AND d.n_tokens > 0""")
        if orphans:
            problems.append(f"{orphans} documents without chunks")
        unembedded = self.value("SELECT COUNT(*) FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM vectors v WHERE v.chunk_id = c.id)")
        if unembedded:
            problems.append(f"{unembedded} chunks without vectors")
        return problems

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()
