"""SQLite (through sqlite-utils, WAL mode) holds everything; FAISS indexes are derived from it."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sqlite_utils

from ..errors import UserError

SCHEMA_VERSION = 1
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_hash(data) -> str:
    """Short key for "the knobs that shaped an artifact": bytes as they are, anything else as sorted JSON."""
    raw = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def check_collection_name(name: str) -> str:
    name = (name or "").strip()
    if not COLLECTION_NAME.match(name):
        raise UserError(
            f"invalid collection name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit"
        )
    return name


class Store:
    """One SQLite file under the data directory. All writes are transactions, so a killed process never
    leaves half a document or half an artifact behind."""

    def __init__(self, home: Path | str):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "ragdemo.db"
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.lock = threading.RLock()
        self._create_schema()

    # ---------------------------------------------------------------- schema
    def _create_schema(self) -> None:
        with self.transaction():
            self.db.execute("""CREATE TABLE IF NOT EXISTS collections (
                id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL)""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS documents (
                id INTEGER PRIMARY KEY, collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
                sha256 TEXT NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL, n_tokens INTEGER NOT NULL,
                text TEXT NOT NULL, created REAL NOT NULL, UNIQUE(collection_id, sha256))""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS chunks (
                id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                ord INTEGER NOT NULL, text TEXT NOT NULL, tok_start INTEGER NOT NULL, tok_end INTEGER NOT NULL,
                char_start INTEGER NOT NULL, char_end INTEGER NOT NULL, UNIQUE(doc_id, ord))""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS vectors (
                chunk_id INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE, embedder TEXT NOT NULL,
                dim INTEGER NOT NULL, vec BLOB NOT NULL, PRIMARY KEY (chunk_id, embedder))""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS artifacts (
                method TEXT NOT NULL, model TEXT NOT NULL, params_hash TEXT NOT NULL, key TEXT NOT NULL,
                chunk_id INTEGER REFERENCES chunks(id) ON DELETE CASCADE,
                collection_id INTEGER REFERENCES collections(id) ON DELETE CASCADE,
                blob BLOB NOT NULL, nbytes INTEGER NOT NULL, meta TEXT, created REAL NOT NULL,
                PRIMARY KEY (method, model, params_hash, key))""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id INTEGER PRIMARY KEY, collection_id INTEGER REFERENCES collections(id) ON DELETE SET NULL,
                question TEXT NOT NULL, method TEXT NOT NULL, model TEXT NOT NULL, result TEXT NOT NULL,
                created REAL NOT NULL)""")
            self.db.execute("CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, ord)")
            self.db.execute("CREATE INDEX IF NOT EXISTS artifacts_chunk ON artifacts(chunk_id)")
            self.db.execute("CREATE INDEX IF NOT EXISTS artifacts_collection ON artifacts(collection_id)")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
            self.db.execute("INSERT OR IGNORE INTO collections (name, created) VALUES (?, ?)", (name, time.time()))
        return int(self.value("SELECT id FROM collections WHERE name = ?", (name,)))

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
                    "INSERT INTO chunks (doc_id, ord, text, tok_start, tok_end, char_start, char_end) VALUES (?,?,?,?,?,?,?)",
                    (doc_id, chunk.ord, chunk.text, chunk.tok_start, chunk.tok_end, chunk.char_start, chunk.char_end),
                ).lastrowid
                self.db.execute("INSERT INTO vectors (chunk_id, embedder, dim, vec) VALUES (?,?,?,?)",
                                (chunk_id, embedder, vec.shape[0], vec.astype(np.float16).tobytes()))
        return int(doc_id)

    def documents(self, collection_id: int) -> list[dict]:
        return self.rows("""SELECT d.id, d.name, d.size, d.n_tokens, d.sha256,
                                   (SELECT COUNT(*) FROM chunks c WHERE c.doc_id = d.id) AS n_chunks
                            FROM documents d WHERE d.collection_id = ? ORDER BY d.id""", (collection_id,))

    def collection_tokens(self, collection_id: int) -> int:
        return int(self.value("SELECT COALESCE(SUM(n_tokens), 0) FROM documents WHERE collection_id = ?",
                              (collection_id,)) or 0)

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

    def vector_signature(self, collection_id: int, embedder: str) -> str:
        """Changes whenever the set of embedded chunks changes; FAISS files carry it to detect staleness.
        SQLite reuses the ids of deleted rows, so ids alone cannot tell a new collection from a dropped one with
        as many chunks: each document's content hash is part of the signature."""
        rows = self.rows("""SELECT d.id, d.sha256, COUNT(*) AS n, SUM(v.chunk_id) AS s, MAX(v.chunk_id) AS m
                            FROM vectors v JOIN chunks c ON c.id = v.chunk_id JOIN documents d ON d.id = c.doc_id
                            WHERE d.collection_id = ? AND v.embedder = ? GROUP BY d.id ORDER BY d.id""",
                         (collection_id, embedder))
        parts = [f"{r['id']}:{r['sha256']}:{r['n']}:{r['s']}:{r['m']}" for r in rows]
        return f"{sum(r['n'] for r in rows)}-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    # ------------------------------------------------------------ artifacts
    def put_artifact(self, method: str, model: str, params_hash: str, key: str, blob: bytes,
                     chunk_id: int | None = None, collection_id: int | None = None, meta: dict | None = None) -> None:
        with self.transaction():
            self.db.execute(
                """INSERT OR REPLACE INTO artifacts (method, model, params_hash, key, chunk_id, collection_id, blob,
                   nbytes, meta, created) VALUES (?,?,?,?,?,?,?,?,?,?)""",
                (method, model, params_hash, key, chunk_id, collection_id, blob, len(blob),
                 json.dumps(meta) if meta else None, time.time()))

    def get_artifacts(self, method: str, model: str, params_hash: str, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            for row in self.rows(f"""SELECT key, blob FROM artifacts WHERE method = ? AND model = ? AND params_hash = ?
                                     AND key IN ({marks})""", (method, model, params_hash, *part)):
                found[row["key"]] = row["blob"]
        return found

    def get_artifact(self, method: str, model: str, params_hash: str, key: str) -> bytes | None:
        return self.get_artifacts(method, model, params_hash, [key]).get(key)

    def artifact_bytes(self, collection_id: int) -> dict[str, int]:
        """Bytes of cached artifacts per method, for chunk-level and collection-level artifacts."""
        rows = self.rows("""SELECT a.method, SUM(a.nbytes) AS nbytes FROM artifacts a
                            LEFT JOIN chunks c ON c.id = a.chunk_id LEFT JOIN documents d ON d.id = c.doc_id
                            WHERE d.collection_id = ? OR a.collection_id = ? GROUP BY a.method""",
                         (collection_id, collection_id))
        return {r["method"]: int(r["nbytes"]) for r in rows}

    def artifact_bytes_by_document(self, collection_id: int) -> dict[tuple[int, str], int]:
        rows = self.rows("""SELECT c.doc_id, a.method, SUM(a.nbytes) AS nbytes FROM artifacts a
                            JOIN chunks c ON c.id = a.chunk_id JOIN documents d ON d.id = c.doc_id
                            WHERE d.collection_id = ? GROUP BY c.doc_id, a.method""", (collection_id,))
        return {(r["doc_id"], r["method"]): int(r["nbytes"]) for r in rows}

    # ----------------------------------------------------------------- runs
    def add_run(self, collection_id: int | None, question: str, result: dict) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO runs (collection_id, question, method, model, result, created) VALUES (?,?,?,?,?,?)",
                            (collection_id, question, result.get("method", ""), result.get("model", ""),
                             json.dumps(result), time.time()))

    def runs(self, collection_id: int | None = None, limit: int = 50) -> list[dict]:
        where, params = ("WHERE collection_id = ?", (collection_id,)) if collection_id is not None else ("", ())
        rows = self.rows(f"SELECT id, question, method, model, result, created FROM runs {where} ORDER BY id DESC LIMIT ?",
                         (*params, limit))
        for row in rows:
            row["result"] = json.loads(row["result"])
        return rows

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
