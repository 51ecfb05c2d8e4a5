"""SQLite (through sqlite-utils, WAL mode) holds everything; FAISS indexes are derived from it."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import sqlite_utils

from ..errors import UserError
from ..forks import renew_in_forked_children
from ..params import Spec, checked

SCHEMA_VERSION = 2  # 2: chunks.sha256, artifacts.basis, content-keyed artifacts (see _migrate_artifacts)
RETRIEVERS = ("float", "binary")
DEFAULT_RESCORE = 10  # the binary path rescores k x rescore Hamming candidates with the float vectors
RESCORE = Spec(int, "the binary retriever rescores the top k x rescore candidates with the float vectors",
               label="rescore", min=1, max=1000)
COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_hash(data) -> str:
    """Short key for "the knobs that shaped an artifact": bytes as they are, anything else as sorted JSON."""
    raw = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def chunk_key(text: str) -> str:
    """The key of a per-chunk artifact: the chunk's text, never its row id (SQLite reuses the ids of deleted
    rows). Model, format version, dtype and knobs go into the artifact's params_hash. The accounting joins
    artifacts to chunks on this key, so every method keys its chunk artifacts this way."""
    return "text:" + sha256(text.encode())


def check_collection_name(name: str) -> str:
    name = (name or "").strip()
    if not COLLECTION_NAME.match(name):
        raise UserError(
            f"invalid collection name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit"
        )
    return name


class StaleContent(UserError):
    """An artifact built from a collection's whole content arrived after that content changed: not stored."""


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact named without reading its blob: its key, when it was written and its size (a rewrite under
    the same key, such as a retrained adapter, is a new `identity`), and how to read it when first needed."""

    identity: tuple  # (method, model, params_hash, key, created, nbytes)
    nbytes: int
    read: Callable[[], bytes | None] = field(compare=False, repr=False)

    def __len__(self) -> int:
        return self.nbytes


@dataclass
class ArtifactRow:
    """One artifact to write; the fields are `put_artifact`'s."""

    method: str
    model: str
    params_hash: str
    key: str
    blob: bytes
    chunk_id: int | None = None
    collection_id: int | None = None
    meta: dict | None = None
    basis: str | None = None


class Store:
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

    # ---------------------------------------------------------------- schema
    def _create_schema(self) -> None:
        with self.transaction():
            self.db.execute("""CREATE TABLE IF NOT EXISTS collections (
                id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL)""")
            self._add_retrieval_columns()
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
            self._create_version_triggers()
            self._migrate_artifacts()
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # Retrieval state per collection: `uid` is random and never reused (SQLite reuses deleted row ids, so a
    # recreated collection can get a dropped one's id), `version` counts document inserts and deletes,
    # `retriever`/`rescore` choose float or binary search. (uid, version) names the collection's content.
    RETRIEVAL_COLUMNS = {"uid": "TEXT", "version": "INTEGER NOT NULL DEFAULT 0",
                         "retriever": "TEXT NOT NULL DEFAULT 'float'", "rescore": f"INTEGER NOT NULL DEFAULT {DEFAULT_RESCORE}"}

    def _add_retrieval_columns(self) -> None:
        """Stores made before these columns existed get them here (SQLite has no ADD COLUMN IF NOT EXISTS)."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(collections)").fetchall()}
        for name, declaration in self.RETRIEVAL_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE collections ADD COLUMN {name} {declaration}")
        self.db.execute("UPDATE collections SET uid = lower(hex(randomblob(16))) WHERE uid IS NULL")

    def _create_version_triggers(self) -> None:
        """The version moves inside the very transaction that adds or removes a document (also through a
        cascade from a dropped collection), so a reader can never see new rows under an old version."""
        for event, row in (("INSERT", "NEW"), ("DELETE", "OLD")):
            self.db.execute(f"""CREATE TRIGGER IF NOT EXISTS documents_{event.lower()}_version AFTER {event} ON documents
                                BEGIN UPDATE collections SET version = version + 1 WHERE id = {row}.collection_id; END""")

    def _migrate_artifacts(self) -> None:
        """Schema 2: chunks carry their text's hash and artifacts are keyed by content.

        Stores from schema 1 get `chunks.sha256` filled in, an `artifacts.basis` column, and lose the artifacts
        that were keyed by row ids (chunk ids, `lora:{collection id}`): no key can reach them any more, so they
        would only be counted as storage. They are caches, rebuilt by the next prepare (a trained adapter has to
        be trained again: the old one may belong to a deleted document whose ids were reused)."""
        chunk_columns = {row[1] for row in self.db.execute("PRAGMA table_info(chunks)").fetchall()}
        if "sha256" not in chunk_columns:
            self.db.execute("ALTER TABLE chunks ADD COLUMN sha256 TEXT")
            rows = self.db.execute("SELECT id, text FROM chunks").fetchall()
            self.db.conn.executemany("UPDATE chunks SET sha256 = ? WHERE id = ?",
                                     [(sha256(text.encode()), chunk_id) for chunk_id, text in rows])
        artifact_columns = {row[1] for row in self.db.execute("PRAGMA table_info(artifacts)").fetchall()}
        if "basis" not in artifact_columns:
            self.db.execute("ALTER TABLE artifacts ADD COLUMN basis TEXT")
        if int(self.value("PRAGMA user_version") or 0) < 2:
            self.db.execute("DELETE FROM artifacts WHERE key NOT LIKE 'text:%'")
        self.db.execute("CREATE INDEX IF NOT EXISTS chunks_sha256 ON chunks(sha256)")
        self.db.execute("CREATE INDEX IF NOT EXISTS artifacts_key ON artifacts(key)")
        self._create_artifact_triggers()
        self._create_artifact_counter()

    def _create_artifact_triggers(self) -> None:
        """Artifacts follow the content they were built from, on every path that changes it (add, delete,
        a cascade from a dropped collection):
        - a chunk artifact is shared by every chunk with the same text; when its owning chunk goes, another
          chunk with that text (in any collection) takes it over, and only the last one takes it along;
        - an artifact with a `basis` was built from the whole collection (a decoder, a codebook, an adapter, codes
          encoded with that decoder): once a document is added or removed it is superseded, so it is deleted
          there and then, and the next prepare builds it for the new content."""
        self.db.execute("""CREATE TRIGGER IF NOT EXISTS chunks_delete_hand_over_artifacts BEFORE DELETE ON chunks
            BEGIN UPDATE artifacts SET chunk_id = (SELECT MIN(c.id) FROM chunks c WHERE c.sha256 = OLD.sha256 AND c.id != OLD.id)
                  WHERE chunk_id = OLD.id AND EXISTS (SELECT 1 FROM chunks c WHERE c.sha256 = OLD.sha256 AND c.id != OLD.id);
            END""")
        for event, row in (("INSERT", "NEW"), ("DELETE", "OLD")):
            self.db.execute(f"""CREATE TRIGGER IF NOT EXISTS documents_{event.lower()}_drop_superseded AFTER {event} ON documents
                BEGIN DELETE FROM artifacts WHERE basis IS NOT NULL AND collection_id = {row}.collection_id; END""")

    def _create_artifact_counter(self) -> None:
        """`changes.artifacts` moves with every artifact row written, replaced or deleted, also by a cascade, a
        trigger or another process on the same file: what a remembered storage account is checked against."""
        self.db.execute("""CREATE TABLE IF NOT EXISTS changes (
            id INTEGER PRIMARY KEY CHECK (id = 0), artifacts INTEGER NOT NULL)""")
        self.db.execute("INSERT OR IGNORE INTO changes (id, artifacts) VALUES (0, 0)")
        for event in ("INSERT", "UPDATE", "DELETE"):
            self.db.execute(f"""CREATE TRIGGER IF NOT EXISTS artifacts_{event.lower()}_counted AFTER {event} ON artifacts
                                BEGIN UPDATE changes SET artifacts = artifacts + 1 WHERE id = 0; END""")

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
            kept = self._remembered.get(key)
            if kept is not None and kept[0] == stamp:
                return kept[1]
            value = compute()
            self._remembered[key] = (stamp, value)
            return value

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
        with self.transaction():
            self.db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
        return collection_id

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
        return f"{sum(r['n'] for r in rows)}-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    # ------------------------------------------------------------ artifacts
    def put_artifact(self, method: str, model: str, params_hash: str, key: str, blob: bytes,
                     chunk_id: int | None = None, collection_id: int | None = None, meta: dict | None = None,
                     basis: str | None = None) -> None:
        """Per-chunk artifacts: `key` = chunk_key(text), `chunk_id` = the chunk that owns it (for cascades).
        Collection-level artifacts: `key` names the content they were built from, `collection_id` owns them.
        `basis` (with `collection_id`): the collection's content signature when the artifact depends on the whole
        collection; it is then deleted as soon as a document is added or removed."""
        self.put_artifacts([ArtifactRow(method, model, params_hash, key, blob, chunk_id, collection_id, meta, basis)])

    def put_artifacts(self, rows: list["ArtifactRow"]) -> None:
        """Several artifacts (see `put_artifact`) in one transaction: a preparation writes each batch at once,
        and a stopped one leaves whole batches only."""
        for row in rows:
            if row.basis is not None and row.collection_id is None:
                raise ValueError("an artifact built from a collection's content needs its collection_id")
        if not rows:
            return
        now = time.time()
        with self.transaction():
            for row in rows:
                if row.basis is not None and self._signature_now(row.collection_id) != row.basis:
                    raise StaleContent(f"{row.method}: the collection changed while it was being built (a document "
                                       "was added or deleted); nothing built for its previous content was stored: "
                                       "run it again")
            self.db.conn.executemany(
                """INSERT OR REPLACE INTO artifacts (method, model, params_hash, key, chunk_id, collection_id, blob,
                   nbytes, meta, created, basis) VALUES (?,?,?,?,?,?,?,?,?,?,?)""",
                [(r.method, r.model, r.params_hash, r.key, r.chunk_id, r.collection_id, r.blob, len(r.blob),
                  json.dumps(r.meta) if r.meta else None, now, r.basis) for r in rows])

    def get_artifacts(self, method: str, model: str, params_hash: str, keys: list[str]) -> dict[str, bytes]:
        return {r["key"]: r["blob"] for r in self._artifact_rows("key, blob", method, model, params_hash, keys)}

    def get_artifact(self, method: str, model: str, params_hash: str, key: str) -> bytes | None:
        return self.get_artifacts(method, model, params_hash, [key]).get(key)

    def artifact_ref(self, method: str, model: str, params_hash: str, key: str) -> StoredArtifact | None:
        """The artifact as a `StoredArtifact` (one primary-key read, no blob), or None when it is not stored."""
        found = self.rows("""SELECT created, nbytes FROM artifacts WHERE method = ? AND model = ? AND params_hash = ?
                             AND key = ?""", (method, model, params_hash, key))
        if not found:
            return None
        where = (method, model, params_hash, key)
        return StoredArtifact((*where, found[0]["created"], found[0]["nbytes"]), int(found[0]["nbytes"]),
                              lambda: self.get_artifact(*where))

    def artifact_keys(self, method: str, model: str, params_hash: str, keys: list[str]) -> set[str]:
        """Which of `keys` are stored, without reading the blobs."""
        return {r["key"] for r in self._artifact_rows("key", method, model, params_hash, keys)}

    def _artifact_rows(self, columns: str, method: str, model: str, params_hash: str, keys: list[str]) -> list[dict]:
        found = []
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            found += self.rows(f"""SELECT {columns} FROM artifacts WHERE method = ? AND model = ? AND params_hash = ?
                                   AND key IN ({marks})""", (method, model, params_hash, *part))
        return found

    def artifact_usage(self, collection_id: int, method: str | None = None, model: str | None = None) -> list[dict]:
        """The one storage account query; every storage figure (Library table, method cards, bench) sums its rows.

        Rows {method, model, params_hash, doc_id, key, nbytes}:
        - per-chunk artifacts whose content is one of the collection's chunks, summed per document (`key` None);
          a text that occurs twice is counted once, under the first document that holds it (a chunk artifact
          not keyed by chunk_key breaks the content-key rule, but is still counted, under its owner's document);
        - collection-level artifacts built from exactly this content (`basis` = its content signature, whichever
          collection of that content built them) or owned by the collection, one row each (`doc_id` None).

        It joins the collection's chunks with the artifacts, so it is remembered until the collection's version
        or the artifact counter moves (answers read it for their storage figures)."""
        rows = self._remembered_value(("usage", collection_id, method, model), collection_id, True,
                                      lambda: self._artifact_usage(collection_id, method, model))
        return [dict(row) for row in rows]  # callers may change their copy

    def _artifact_usage(self, collection_id: int, method: str | None, model: str | None) -> list[dict]:
        filters, params = "", []
        for column, wanted in (("method", method), ("model", model)):
            if wanted is not None:
                filters += f" AND a.{column} = ?"
                params.append(wanted)
        return self.rows(f"""
            WITH mine AS (SELECT 'text:' || c.sha256 AS key, MIN(c.doc_id) AS doc_id
                          FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE d.collection_id = ? GROUP BY c.sha256)
            SELECT a.method, a.model, a.params_hash, mine.doc_id, NULL AS key, SUM(a.nbytes) AS nbytes
              FROM artifacts a JOIN mine ON mine.key = a.key WHERE 1 {filters}
              GROUP BY a.method, a.model, a.params_hash, mine.doc_id
            UNION ALL
            SELECT a.method, a.model, a.params_hash, c.doc_id, NULL, SUM(a.nbytes)
              FROM artifacts a JOIN chunks c ON c.id = a.chunk_id JOIN documents d ON d.id = c.doc_id
              WHERE d.collection_id = ? AND a.key NOT LIKE 'text:%' {filters}
              GROUP BY a.method, a.model, a.params_hash, c.doc_id
            UNION ALL
            SELECT a.method, a.model, a.params_hash, NULL, a.key, a.nbytes
              FROM artifacts a WHERE a.chunk_id IS NULL AND (a.collection_id = ? OR a.basis = ?) {filters}""",
                         (collection_id, *params, collection_id, *params, collection_id,
                          self.content_signature(collection_id), *params))

    def artifact_account(self, collection_id: int, method: str, model: str, chunk_hash: str,
                         shared: dict[str, tuple[str, str]]) -> tuple[int, dict[str, int]]:
        """One method's account at one setting of its knobs: bytes of its per-chunk artifacts stored under
        `chunk_hash` for the collection's chunks, and of each named collection-level part {name: (params_hash,
        key)} that exists (a `Method.storage` wraps them in a StorageAccount)."""
        chunk_bytes, found = 0, {}
        wanted = {where: name for name, where in shared.items()}
        for row in self.artifact_usage(collection_id, method, model):
            if row["doc_id"] is not None and row["params_hash"] == chunk_hash:
                chunk_bytes += int(row["nbytes"])
            elif row["doc_id"] is None and (row["params_hash"], row["key"]) in wanted:
                found[wanted[(row["params_hash"], row["key"])]] = int(row["nbytes"])
        return chunk_bytes, found

    def artifact_bytes(self, collection_id: int) -> dict[str, int]:
        """Everything each method keeps for the collection (per-chunk and collection-level), whatever the knobs."""
        return self._summed_usage(collection_id, lambda row: row["method"])

    def artifact_bytes_by_document(self, collection_id: int) -> dict[tuple[int, str], int]:
        """Per-chunk artifact bytes per (document, method); collection-level parts belong to no document."""
        return self._summed_usage(collection_id, lambda row: (row["doc_id"], row["method"]) if row["doc_id"] is not None
                                  else None)

    def artifact_bytes_shared(self, collection_id: int) -> dict[str, int]:
        """Collection-level artifact bytes per method (decoders, codebooks, adapters): what every document shares."""
        return self._summed_usage(collection_id, lambda row: row["method"] if row["doc_id"] is None else None)

    def _summed_usage(self, collection_id: int, key_of) -> dict:
        """artifact_usage's bytes summed by `key_of(row)`; rows it maps to None are left out."""
        total: dict = {}
        for row in self.artifact_usage(collection_id):
            key = key_of(row)
            if key is not None:
                total[key] = total.get(key, 0) + int(row["nbytes"])
        return total

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
