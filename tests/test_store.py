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
    store.put_artifact("m", "model", "h1", f"chunk:{chunk['chunk_id']}", b"1234", chunk_id=chunk["chunk_id"])
    assert store.get_artifact("m", "model", "h1", f"chunk:{chunk['chunk_id']}") == b"1234"
    assert store.get_artifact("m", "model", "h2", f"chunk:{chunk['chunk_id']}") is None
    assert store.artifact_bytes(store.collection_id("default")) == {"m": 4}
    tiny_bench.delete(chunk["doc"])  # artifacts go with their chunks
    assert store.get_artifact("m", "model", "h1", f"chunk:{chunk['chunk_id']}") is None


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 80, "semi;colon", "\x00"])
def test_odd_collection_names_are_refused(tiny_bench, name):
    with pytest.raises(UserError, match="collection name"):
        tiny_bench.store.collection_id(name)
