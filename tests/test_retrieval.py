"""Retrieval: the collection version counter, the binary retriever and the single-query embedding path."""
import sqlite3

import numpy as np
import pytest

from ragdemo.errors import UserError
from ragdemo.ingest import Chunk, ingest_files
from ragdemo.store import Corpus, IndexCache, Store
from ragdemo.store.index import sign_codes

EMBEDDER = "test-embedder"


def _add_random_document(store: Store, cid: int, name: str, vectors: np.ndarray) -> int:
    chunks = [Chunk(i, f"{name} chunk {i}", i * 4, (i + 1) * 4, 0, 0) for i in range(len(vectors))]
    return store.add_document(cid, name, f"sha-{name}", 0, "", chunks, vectors, EMBEDDER)


def _unit(rng, n: int, dim: int = 64) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _ingest_docs(bench, docs_dir) -> None:
    """Store the documents only (no method preparation): these tests are about retrieval."""
    cid = bench.store.collection_id(bench.settings.default_collection)
    ingest_files(bench.store, cid, [(p.name, p) for p in sorted(docs_dir.iterdir())], bench.models.lm.tokenizer,
                 bench.models.embedder, bench.settings.chunk_tokens, 10**7, None)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "home")


# ---------------------------------------------------------------------------------- version counter

def test_version_moves_with_ingest_and_delete_and_not_with_a_failed_ingest(store):
    cid = store.collection_id("c")
    rng = np.random.default_rng(0)
    assert store.collection_state(cid)["version"] == 0
    _add_random_document(store, cid, "a", _unit(rng, 3))
    assert store.collection_state(cid)["version"] == 1
    bad = [Chunk(0, "x", 0, 1, 0, 1), Chunk(0, "y", 1, 2, 1, 2)]  # duplicate ord: the transaction rolls back
    with pytest.raises(Exception):
        store.add_document(cid, "b", "sha-b", 0, "", bad, _unit(rng, 2), EMBEDDER)
    assert store.collection_state(cid)["version"] == 1
    store.delete_document(cid, "a")
    assert store.collection_state(cid)["version"] == 2


def test_retrievals_read_the_version_not_every_vector(store):
    """The content signature (a pass over every vector row) runs once per version, never per retrieval."""
    cid = store.collection_id("c")
    rng = np.random.default_rng(1)
    _add_random_document(store, cid, "a", _unit(rng, 20))
    cache = IndexCache(store)
    query = _unit(rng, 1)
    for _ in range(5):
        cache.get(cid, EMBEDDER).search(query, 3)
    assert cache.signature_scans == 1 and cache.rebuilds == 1
    _add_random_document(store, cid, "b", _unit(rng, 5))
    assert len(cache.get(cid, EMBEDDER)) == 25 and len(cache.get(cid, EMBEDDER, "binary")) == 25
    assert cache.signature_scans == 2  # one scan per version, shared by the float and binary index


def test_another_writer_is_seen_through_the_version(store, tmp_path):
    """A second Store on the same file (another process) adds a document: the first cache notices."""
    cid = store.collection_id("c")
    rng = np.random.default_rng(2)
    _add_random_document(store, cid, "a", _unit(rng, 4))
    cache = IndexCache(store)
    assert len(cache.get(cid, EMBEDDER)) == 4
    other = Store(tmp_path / "home")
    _add_random_document(other, cid, "b", _unit(rng, 6))
    assert len(cache.get(cid, EMBEDDER)) == 10


def test_a_recreated_collection_gets_a_new_uid(store):
    """Same id, same version after one ingest: only the never-reused uid tells the two collections apart."""
    rng = np.random.default_rng(3)
    cid = store.collection_id("c")
    _add_random_document(store, cid, "a", _unit(rng, 4))
    first = store.collection_state(cid)
    with store.transaction():
        store.db.execute("DELETE FROM collections WHERE id = ?", (cid,))
    assert store.collection_id("c") == cid
    _add_random_document(store, cid, "a", _unit(rng, 4))
    second = store.collection_state(cid)
    assert second["version"] == first["version"] and second["uid"] != first["uid"]


def test_a_store_made_before_the_version_columns_gets_them(tmp_path):
    home = tmp_path / "old"
    home.mkdir()
    conn = sqlite3.connect(home / "ragdemo.db")
    conn.execute("CREATE TABLE collections (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL)")
    conn.execute("INSERT INTO collections (name, created) VALUES ('old', 0)")
    conn.commit()
    conn.close()
    store = Store(home)
    state = store.collection_state(store.collection_id("old", create=False))
    assert state["version"] == 0 and state["retriever"] == "float" and len(state["uid"]) == 32
    rng = np.random.default_rng(4)
    _add_random_document(store, 1, "a", _unit(rng, 2))
    assert store.collection_state(1)["version"] == 1


def test_answer_time_checks_do_not_scan_the_collection(tiny_bench, docs_dir):
    """require_documents and a warm retrieval run a fixed set of statements whatever the collection holds:
    no GROUP BY over vectors, no COUNT per document."""
    _ingest_docs(tiny_bench, docs_dir)
    corpus = tiny_bench.corpus()
    corpus.retrieve("warm", 2)
    statements: list[str] = []
    tiny_bench.store.db.conn.set_trace_callback(statements.append)
    try:
        corpus.require_documents("rag")
        corpus.retrieve("Eiffel Tower", 2)
    finally:
        tiny_bench.store.db.conn.set_trace_callback(None)
    text = " ".join(statements).upper()
    assert statements and "GROUP BY" not in text and "COUNT(" not in text
    assert corpus.indexes.signature_scans == 1


# ---------------------------------------------------------------------------------- binary retriever

def _filled(store, n_docs=4, per_doc=25, dim=64, seed=5):
    cid = store.collection_id("c")
    rng = np.random.default_rng(seed)
    for d in range(n_docs):
        _add_random_document(store, cid, f"d{d}", _unit(rng, per_doc, dim))
    return cid, rng


def test_sign_codes_are_one_bit_per_dimension():
    vectors = np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.2, -0.2, 1.0]], np.float32)
    codes = sign_codes(vectors)
    assert codes.shape == (1, 2) and codes.dtype == np.uint8
    assert np.unpackbits(codes, axis=1)[0, :9].tolist() == [1, 0, 0, 1, 0, 1, 1, 0, 1]


def test_binary_index_agrees_with_brute_force_hamming(store):
    cid, rng = _filled(store)
    ids, matrix = store.vectors(cid, EMBEDDER)
    index = IndexCache(store).get(cid, EMBEDDER, "binary")
    queries = _unit(rng, 7)
    brute = ((queries > 0)[:, None, :] != (matrix > 0)[None, :, :]).sum(-1)  # differing signs, bit by bit
    distances, found = index.hamming_search(queries, 10)
    for row in range(len(queries)):
        expected = np.sort(brute[row])[:10]
        assert distances[row].tolist() == expected.tolist()
        position = {int(c): p for p, c in enumerate(ids)}
        assert [brute[row, position[int(c)]] for c in found[row]] == distances[row].tolist()


def test_rescoring_over_the_whole_collection_returns_the_float_top_k(store):
    cid, rng = _filled(store)
    cache = IndexCache(store)
    queries = _unit(rng, 6)
    float_d, float_ids = cache.get(cid, EMBEDDER, "float").search(queries, 5)
    binary = cache.get(cid, EMBEDDER, "binary")
    binary_d, binary_ids = binary.search(queries, 5, rescore=len(binary))  # k x rescore >= collection
    assert np.array_equal(binary_ids, float_ids)
    assert np.allclose(binary_d, float_d, atol=1e-5)
    _, narrow = binary.search(queries, 5, rescore=1)  # the Hamming order alone: not always the float one
    assert narrow.shape == (6, 5)


def test_binary_index_is_32x_smaller(store):
    cid, _ = _filled(store, dim=384)
    cache = IndexCache(store)
    float_index, binary_index = cache.get(cid, EMBEDDER, "float"), cache.get(cid, EMBEDDER, "binary")
    assert binary_index.nbytes == len(binary_index) * 48
    assert float_index.float32_bytes == 32 * binary_index.nbytes
    assert float_index.nbytes == 16 * binary_index.nbytes  # the float index keeps SQLite's float16, losslessly
    on_disk = [cache.path(cid, EMBEDDER, kind).stat().st_size for kind in ("float", "binary")]
    assert on_disk[0] > 10 * on_disk[1]  # the 8-byte chunk ids come on top of both


def test_binary_index_rebuilds_after_its_file_is_deleted_and_follows_deletes(store):
    cid, rng = _filled(store)
    cache = IndexCache(store)
    assert len(cache.get(cid, EMBEDDER, "binary")) == 100
    cache.path(cid, EMBEDDER, "binary").unlink()
    fresh = IndexCache(store)
    assert len(fresh.get(cid, EMBEDDER, "binary")) == 100 and fresh.rebuilds == 1
    store.delete_document(cid, "d0")
    binary = fresh.get(cid, EMBEDDER, "binary")
    assert len(binary) == 75
    _, found = binary.search(_unit(rng, 3), 5, rescore=100)
    remaining = set(store.vectors(cid, EMBEDDER)[0].tolist())
    assert set(found.ravel().tolist()) <= remaining


def test_collection_retriever_setting_reaches_search_and_notes(tiny_bench, docs_dir):
    _ingest_docs(tiny_bench, docs_dir)
    corpus = tiny_bench.corpus()
    assert corpus.retrieval_settings() == {"retriever": "float", "rescore": 10}
    assert "float" in corpus.retriever_note
    float_hits = corpus.retrieve("Eiffel Tower in Paris", 2)[0]
    assert {h["retriever"] for h in float_hits} == {"float"}
    assert tiny_bench.set_retrieval(None, "binary", 50) == {"retriever": "binary", "rescore": 50}
    later = tiny_bench.corpus()  # stored with the collection: a new corpus (a new request) sees it
    assert "binary" in later.retriever_note and "x 50" in later.retriever_note
    binary_hits = later.retrieve("Eiffel Tower in Paris", 2)[0]
    assert {h["retriever"] for h in binary_hits} == {"binary"}
    assert [h["chunk_id"] for h in binary_hits] == [h["chunk_id"] for h in float_hits]  # rescore covers it all
    assert tiny_bench.corpus(retriever="float").retrieval_settings()["retriever"] == "float"  # per-call override
    with pytest.raises(UserError, match="retriever"):
        tiny_bench.set_retrieval(None, "ternary")
    with pytest.raises(UserError, match="retriever"):
        Corpus(tiny_bench.store, "default", tiny_bench.models, retriever="ternary")
    # every answer that retrieved says which retriever found its passages; closed book retrieves nothing
    rag, closed = tiny_bench.ask("Where is the Eiffel Tower?", ["rag", "closed_book"], record=False)
    assert any(n.startswith("retriever: binary") for n in rag.notes)
    assert not any(n.startswith("retriever:") for n in closed.notes)


def test_compare_retrievers_reports_recall_and_bytes(tiny_bench, docs_dir):
    _ingest_docs(tiny_bench, docs_dir)
    corpus = tiny_bench.corpus()
    n = len(corpus.chunks())
    report = corpus.compare_retrievers(["Eiffel Tower", "yellow bananas", "potassium"], k=2, rescore=n)
    assert report.recall_at_k == 1.0 and report.binary_ids == report.float_ids
    assert report.float32_bytes == 32 * report.binary_index_bytes == n * 384 * 4
    assert report.float_index_bytes == n * 384 * 2 and report.size_ratio == 32
    assert "recall@2 1.000" in report.summary() and "32x smaller" in report.summary()


# ---------------------------------------------------------------------------------- query embedding

def test_single_query_fast_path_matches_sentence_transformers(tiny_bench):
    embedder = tiny_bench.models.embedder
    assert embedder.direct is not None  # the embedded MiniLM takes the fast path
    texts = ["When was the Eiffel Tower completed?", "x", "a much longer question " * 40]
    expected = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = np.concatenate([embedder.embed([t]) for t in texts])
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.allclose(got, expected, atol=1e-5)


@pytest.mark.slow  # three CLI processes, each loading the models
def test_cli_sets_the_retriever_on_ingest_and_overrides_it_per_question(tmp_path, tiny_model_dir, docs_dir):
    from tests.test_cli import run

    home = tmp_path / "home"
    out = run(["ingest", *map(str, sorted(docs_dir.iterdir())), "--collection", "demo", "--no-prepare",
               "--retriever", "binary", "--rescore", "20"], home, tiny_model_dir)
    assert "retriever: binary (binary rescore x20)" in out.stdout
    store = Store(home)
    assert store.collection_state(store.collection_id("demo", create=False))["retriever"] == "binary"
    asked = run(["ask", "When was the tower completed?", "--collection", "demo", "--methods", "rag", "--json",
                 "--retriever", "float"], home, tiny_model_dir)
    assert '"method": "rag"' in asked.stdout
    bad = run(["ask", "hi", "--collection", "demo", "--retriever", "ternary"], home, tiny_model_dir, check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_float_index_is_exact_and_rebuilds_an_older_format(store):
    """The float16 index returns the brute-force float32 L2 order; a file in another format is rebuilt."""
    cid, rng = _filled(store)
    ids, matrix = store.vectors(cid, EMBEDDER)
    cache = IndexCache(store)
    queries = _unit(rng, 5)
    distances, found = cache.get(cid, EMBEDDER).search(queries, 4)
    brute = ((queries[:, None, :] - matrix[None, :, :]) ** 2).sum(-1)
    assert np.array_equal(found, ids[np.argsort(brute, axis=1)[:, :4]])
    assert np.allclose(distances, np.sort(brute, axis=1)[:, :4], atol=1e-5)
    meta = cache.path(cid, EMBEDDER).with_suffix(".json")
    meta.write_text(meta.read_text().replace('"format": "fp16-l2"', '"format": "flat-l2"'))
    fresh = IndexCache(store)
    fresh.get(cid, EMBEDDER)
    assert fresh.rebuilds == 1
