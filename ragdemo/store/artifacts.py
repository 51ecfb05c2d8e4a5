"""Artifacts in the store: content-keyed blobs a method builds offline (per chunk or per collection), written in
transactions that refuse stale content, read by key, and the one storage account every storage figure sums.
`Store` inherits the queries."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..hashing import sha256


def chunk_key(text: str) -> str:
    """The key of a per-chunk artifact: the chunk's text, never its row id (SQLite reuses the ids of deleted
    rows). Model, format version, dtype and knobs go into the artifact's params_hash. The accounting joins
    artifacts to chunks on this key, so every method keys its chunk artifacts this way."""
    return "text:" + sha256(text.encode())


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


class ArtifactsMixin:
    """Artifact writes, reads and the storage account of a `Store` (its `rows`, `transaction`, `db`,
    `content_signature` and remembered values)."""

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
