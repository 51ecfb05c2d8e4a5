"""The store's SQLite schema: the tables, the triggers that keep collection versions and artifacts in step with
the content on every path that changes it, and the migration of stores made at schema 1. `Store` inherits it."""
from __future__ import annotations

from ..hashing import sha256

SCHEMA_VERSION = 2  # 2: chunks.sha256, artifacts.basis, content-keyed artifacts (see _migrate_artifacts)
DEFAULT_RESCORE = 10  # the binary path rescores k x rescore Hamming candidates with the float vectors


class SchemaMixin:
    """Creates and migrates the schema on `self.db` (a `Store`), inside one transaction."""

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
