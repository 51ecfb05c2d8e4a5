import numpy as np
import pytest

from ragdemo.errors import UserError
from ragdemo.store import IndexCache, Store


def test_ingest_dedup_and_reopen(tiny_bench, docs_dir):
    reports = tiny_bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())])
    assert [r.status for r in reports] == ["added", "added"]
    again = tiny_bench.ingest([("copy-of-eiffel.txt", (docs_dir / "eiffel.txt").read_bytes())])
    assert again[0].status == "duplicate" and "eiffel.txt" in again[0].message
    home = tiny_bench.settings.home
    tiny_bench.store.close()
    reopened = Store(home)
    cid = reopened.collection_id("default", create=False)
    docs = reopened.documents(cid)
    assert [d["name"] for d in docs] == ["bananas.md", "eiffel.txt"]
    assert all(d["n_chunks"] >= 1 and d["n_tokens"] > 0 for d in docs)
    assert reopened.integrity_problems() == []


def test_same_file_in_two_collections_is_not_a_duplicate(tiny_bench, docs_dir):
    data = (docs_dir / "eiffel.txt").read_bytes()
    assert tiny_bench.ingest([("e.txt", data)], "one")[0].status == "added"
    assert tiny_bench.ingest([("e.txt", data)], "two")[0].status == "added"


def test_faiss_index_rebuilds_after_its_file_is_deleted(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    corpus = tiny_bench.corpus()
    first = corpus.search(["Eiffel Tower Paris"], 3)[0]
    path = corpus.indexes.path(corpus.collection_id, corpus.embedder.name)
    assert path.exists()
    path.unlink()
    fresh = IndexCache(tiny_bench.store)  # a new process: nothing in memory
    corpus.indexes = fresh
    second = corpus.search(["Eiffel Tower Paris"], 3)[0]
    assert fresh.rebuilds == 1 and path.exists()
    assert [h["chunk_id"] for h in first] == [h["chunk_id"] for h in second]
    assert "Eiffel" in second[0]["text"]


def test_index_follows_deletes(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    corpus = tiny_bench.corpus()
    assert len(corpus.index()) == len(corpus.chunks())
    tiny_bench.delete("eiffel.txt")
    assert len(corpus.index()) == len(corpus.chunks())
    assert all("Eiffel" not in h["text"] for h in corpus.search(["Eiffel Tower"], 5)[0])


def test_a_recreated_collection_never_reads_the_dropped_ones_index(tiny_bench):
    """SQLite reuses deleted ids: a new collection can get the old collection's id and chunk ids. Retrieval
    must still search the new text (this once made the needle benchmark search the previous haystack)."""
    store = tiny_bench.store

    def fill(text: str):
        tiny_bench.ingest([("doc.txt", text.encode())], "bench")
        return tiny_bench.corpus("bench")

    first = fill("The Eiffel Tower is in Paris. " * 20 + "Bananas are yellow fruit. " * 20)
    first.search(["yellow bananas"], 1)
    old_chunks = [c["chunk_id"] for c in first.chunks()]
    with store.transaction():
        store.db.execute("DELETE FROM collections WHERE id = ?", (first.collection_id,))
    second = fill("Mountains are tall and cold. " * 20 + "Rivers flow into the big sea. " * 20)
    assert second.collection_id == first.collection_id  # the ids really were reused
    assert [c["chunk_id"] for c in second.chunks()] == old_chunks
    hit = second.search(["tall cold mountains"], 1)[0][0]
    assert "Mountains" in hit["text"]
    assert hit["text"] in [c["text"] for c in second.chunks()]


def test_failed_ingest_stores_nothing(tiny_bench, docs_dir):
    store = tiny_bench.store
    cid = store.collection_id("default")
    from ragdemo.ingest import Chunk

    chunks = [Chunk(0, "a", 0, 1, 0, 1), Chunk(0, "b", 1, 2, 1, 2)]  # duplicate ord violates UNIQUE(doc, ord)
    with pytest.raises(Exception):
        store.add_document(cid, "x.txt", "abc", 2, "ab", chunks, np.zeros((2, 4), np.float32), "e")
    assert store.documents(cid) == [] and store.value("SELECT COUNT(*) FROM chunks") == 0


def test_artifacts_and_runs(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    store = tiny_bench.store
    chunk = tiny_bench.corpus().chunks()[0]
    from ragdemo.store import chunk_key

    key = chunk_key(chunk["text"])
    store.put_artifact("m", "model", "h1", key, b"1234", chunk_id=chunk["chunk_id"])
    assert store.get_artifact("m", "model", "h1", key) == b"1234"
    assert store.get_artifact("m", "model", "h2", key) is None
    assert store.artifact_bytes(store.collection_id("default")) == {"m": 4}
    assert store.artifact_bytes_by_document(store.collection_id("default")) == {(chunk["doc_id"], "m"): 4}
    tiny_bench.delete(chunk["doc"])  # artifacts go with their chunks
    assert store.get_artifact("m", "model", "h1", key) is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 80, "semi;colon", "\x00"])
def test_odd_collection_names_are_refused(tiny_bench, name):
    with pytest.raises(UserError, match="collection name"):
        tiny_bench.store.collection_id(name)


# ------------------------------------------------------------------- content-keyed artifacts, one account

def test_chunk_artifacts_are_keyed_by_text_and_shared_by_identical_chunks(tiny_bench, docs_dir):
    from ragdemo.store import chunk_key

    data = (docs_dir / "eiffel.txt").read_bytes()
    tiny_bench.ingest([("e.txt", data)], "one")
    tiny_bench.ingest([("e.txt", data)], "two")
    store, one, two = tiny_bench.store, tiny_bench.corpus("one"), tiny_bench.corpus("two")
    for chunk in one.chunks():  # built once, for collection one
        store.put_artifact("m", "model", "h", chunk_key(chunk["text"]), b"x" * 10, chunk_id=chunk["chunk_id"])
    n = len({c["text"] for c in one.chunks()})
    assert store.artifact_bytes(one.collection_id) == store.artifact_bytes(two.collection_id) == {"m": 10 * n}
    assert store.artifact_account(two.collection_id, "m", "model", "h", {}) == (10 * n, {})
    tiny_bench.delete("e.txt", "one")  # the owner goes; collection two still holds the same text
    assert store.artifact_bytes(two.collection_id) == {"m": 10 * n}
    tiny_bench.delete("e.txt", "two")  # the last chunk with that text takes its artifacts along
    assert store.value("SELECT COUNT(*) FROM artifacts") == 0


def test_collection_artifacts_built_from_content_go_when_the_content_changes(tiny_bench, docs_dir):
    store = tiny_bench.store
    tiny_bench.ingest([("e.txt", (docs_dir / "eiffel.txt").read_bytes())])
    cid = tiny_bench.corpus().collection_id
    sig = store.content_signature(cid)
    store.put_artifact("m", "model", "h", f"decoder:{sig}", b"d" * 7, collection_id=cid, basis=sig)
    store.put_artifact("m", "model", "h", "settings", b"s" * 3, collection_id=cid)  # not built from the content
    assert store.artifact_account(cid, "m", "model", "none", {"decoder": ("h", f"decoder:{sig}")}) == (0, {"decoder": 7})
    tiny_bench.ingest([("b.md", (docs_dir / "bananas.md").read_bytes())])
    assert store.content_signature(cid) != sig
    assert store.artifact_bytes(cid) == {"m": 3}  # the superseded decoder is gone at once
    with pytest.raises(ValueError):
        store.put_artifact("m", "model", "h", "x", b"1", basis=sig)  # content-built needs its collection


def test_content_signature_ignores_row_ids_and_order(tiny_bench, docs_dir):
    store = tiny_bench.store
    files = [(p.name, p.read_bytes()) for p in sorted(docs_dir.iterdir())]
    tiny_bench.ingest(files, "forward")
    tiny_bench.ingest(files[::-1], "reverse")
    sig = store.content_signature(tiny_bench.corpus("forward").collection_id)
    assert sig == store.content_signature(tiny_bench.corpus("reverse").collection_id)
    tiny_bench.delete("eiffel.txt", "reverse")
    assert store.content_signature(tiny_bench.corpus("reverse").collection_id) != sig


def test_a_schema_1_store_is_migrated(tmp_path):
    """Stores made before content keys: chunks get their text hash, row-id keyed artifacts (unreachable now)
    are dropped, documents stay."""
    import sqlite3

    home = tmp_path / "old"
    home.mkdir()
    conn = sqlite3.connect(home / "ragdemo.db")
    conn.executescript("""
        CREATE TABLE collections (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL);
        CREATE TABLE documents (id INTEGER PRIMARY KEY, collection_id INTEGER NOT NULL REFERENCES collections(id)
            ON DELETE CASCADE, sha256 TEXT NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL, n_tokens INTEGER NOT NULL,
            text TEXT NOT NULL, created REAL NOT NULL, UNIQUE(collection_id, sha256));
        CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            ord INTEGER NOT NULL, text TEXT NOT NULL, tok_start INTEGER NOT NULL, tok_end INTEGER NOT NULL,
            char_start INTEGER NOT NULL, char_end INTEGER NOT NULL, UNIQUE(doc_id, ord));
        CREATE TABLE artifacts (method TEXT NOT NULL, model TEXT NOT NULL, params_hash TEXT NOT NULL, key TEXT NOT NULL,
            chunk_id INTEGER REFERENCES chunks(id) ON DELETE CASCADE,
            collection_id INTEGER REFERENCES collections(id) ON DELETE CASCADE,
            blob BLOB NOT NULL, nbytes INTEGER NOT NULL, meta TEXT, created REAL NOT NULL,
            PRIMARY KEY (method, model, params_hash, key));
        INSERT INTO collections VALUES (1, 'default', 0);
        INSERT INTO documents VALUES (1, 1, 'abc', 'a.txt', 5, 2, 'hello world', 0);
        INSERT INTO chunks VALUES (1, 1, 0, 'hello world', 0, 2, 0, 11);
        INSERT INTO artifacts VALUES ('lloco', 'm', 'h', 'chunk:1', 1, NULL, X'00', 1, NULL, 0);
        INSERT INTO artifacts VALUES ('lloco', 'm', 'h2', 'lora:1', NULL, 1, X'0000', 2, NULL, 0);
        PRAGMA user_version = 1;
    """)
    conn.commit()
    conn.close()
    store = Store(home)
    from ragdemo.store import chunk_key
    from ragdemo.store.db import SCHEMA_VERSION, sha256

    assert store.value("PRAGMA user_version") == SCHEMA_VERSION >= 2
    assert store.value("SELECT sha256 FROM chunks WHERE id = 1") == sha256(b"hello world")
    assert store.value("SELECT COUNT(*) FROM artifacts") == 0 and store.artifact_bytes(1) == {}
    assert [d["name"] for d in store.documents(1)] == ["a.txt"]
    store.put_artifact("lloco", "m", "h", chunk_key("hello world"), b"123", chunk_id=1)
    assert store.artifact_bytes_by_document(1) == {(1, "lloco"): 3}
    store.close()
    assert Store(home).artifact_bytes(1) == {"lloco": 3}  # reopening does not migrate again


def test_signature_and_storage_account_are_remembered_until_something_changes(tiny_bench, docs_dir, monkeypatch):
    """Answers read both; each is one scan per state of the collection and its artifacts, and every change moves
    that state: a document added or deleted, an artifact written, a cascade, another process on the same file."""
    from ragdemo.store import chunk_key

    store = tiny_bench.store
    tiny_bench.ingest([("e.txt", (docs_dir / "eiffel.txt").read_bytes())])
    cid = tiny_bench.corpus().collection_id
    scans = []
    real = store._artifact_usage
    monkeypatch.setattr(store, "_artifact_usage", lambda *a: scans.append(a) or real(*a))
    chunk = tiny_bench.corpus().chunks()[0]
    assert store.artifact_bytes(cid) == {}
    first = len(scans)  # 0 when ingest's own read (what it dropped) is still remembered, else 1
    assert first <= 1 and store.artifact_bytes(cid) == {} and len(scans) == first  # the second read was remembered
    store.put_artifact("m", "model", "h", chunk_key(chunk["text"]), b"1234", chunk_id=chunk["chunk_id"])
    assert store.artifact_bytes(cid) == {"m": 4} and len(scans) == first + 1
    other = Store(store.home)  # another process writes: the counter is in the file, so this one sees it move
    other.put_artifact("m", "model", "h2", chunk_key(chunk["text"]), b"12", chunk_id=chunk["chunk_id"])
    other.close()
    assert store.artifact_bytes(cid) == {"m": 6}
    sig = store.content_signature(cid)
    tiny_bench.ingest([("b.md", (docs_dir / "bananas.md").read_bytes())])
    assert store.content_signature(cid) != sig
    tiny_bench.delete("e.txt")  # the chunk's artifacts go by cascade
    assert store.artifact_bytes(cid) == {}
    assert store.content_signature(cid) != sig
