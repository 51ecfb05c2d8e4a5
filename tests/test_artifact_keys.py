"""Artifacts are keyed by the content they depend on, never by row ids, and every byte is counted once.

SQLite reuses the ids of deleted rows: delete a document, add another with different text and as many chunks,
and the new chunks (and document) get the old ids. Nothing stored for the old text may be read for the new one.
"""
import pytest
from safetensors.numpy import load as st_load

from ragdemo.ingest import ingest_files
from ragdemo.methods import get_method
from ragdemo.units import fmt_bytes

MOUNTAINS = "Mountains are tall and cold places with snow on top. " * 14
RIVERS = "Rivers carry fresh water from the hills down to the sea. " * 14
TOWER = "The Eiffel Tower is a wrought-iron lattice tower in Paris, built in 1889. " * 10
QUESTION = "What is on top of the mountains?"
BTR = {"split": 2, "bits": 1, "k": 2, "max_new_tokens": 2}


def add(bench, name: str, text: str, collection: str = "default"):
    """Store a document without preparing anything (ingest's own preparation is not under test here)."""
    corpus = bench.corpus(collection)
    reports = ingest_files(bench.store, corpus.collection_id, [(name, text.encode())], corpus.lm.tokenizer,
                           corpus.embedder, bench.settings.chunk_tokens)
    assert reports[0].status == "added", reports[0].message
    return corpus


def replace_with_same_ids(bench, old_name: str, new_name: str, new_text: str, collection: str = "default"):
    """Delete a document, add another with different text: the chunk ids really are reused."""
    corpus = bench.corpus(collection)
    old_ids = [c["chunk_id"] for c in corpus.chunks()]
    old_texts = [c["text"] for c in corpus.chunks()]
    bench.store.delete_document(corpus.collection_id, old_name)
    add(bench, new_name, new_text, collection)
    assert [c["chunk_id"] for c in corpus.chunks()] == old_ids  # the precondition of every bug below
    assert [c["text"] for c in corpus.chunks()] != old_texts
    return corpus


def decoder_blobs(store) -> list[bytes]:
    return [r["blob"] for r in store.rows("SELECT blob FROM artifacts WHERE method = 'btr' AND key LIKE 'decoder:%'")]


def btr_params(**extra):
    return get_method("btr").Params(**{**BTR, **extra})


# ---------------------------------------------------------------------------------------------- BTR

def test_btr_decoder_is_fitted_again_for_new_text_with_reused_ids(tiny_bench):
    btr = get_method("btr")
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    btr.prepare(corpus, btr_params())
    (old,) = decoder_blobs(tiny_bench.store)
    corpus = replace_with_same_ids(tiny_bench, "m.txt", "r.txt", RIVERS)
    btr.prepare(corpus, btr_params())
    (new,) = decoder_blobs(tiny_bench.store)  # refitted on the new text, and the old one is gone
    assert new != old
    assert btr.storage(corpus, btr_params()).shared["decoder"] == len(new)
    fresh = add(tiny_bench, "r.txt", RIVERS, "fresh")  # the same content elsewhere: the same decoder serves it
    btr.prepare(fresh, btr_params())
    assert decoder_blobs(tiny_bench.store) == [new]
    assert btr.storage(fresh, btr_params()).shared["decoder"] == len(new)


def test_btr_offline_merging_answers_after_delete_and_readd(tiny_bench):
    btr = get_method("btr")
    merged = btr_params(r_o=0.5)
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    btr.prepare(corpus, merged)
    corpus = replace_with_same_ids(tiny_bench, "m.txt", "r.txt", RIVERS)
    result = btr.answer("Where does the water go?", corpus, merged)  # raised KeyError: the old codebook was found
    assert not result.error and result.new_tokens > 0


@pytest.mark.parametrize("calibrate", [True, False])
def test_btr_adapter_is_not_reused_for_new_text(tiny_bench, calibrate):
    btr = get_method("btr")
    params = btr_params(calibrate=calibrate, lora_steps=2)
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    btr.finetune(corpus, params)
    assert btr._plan(QUESTION, corpus, params).adapter
    corpus = replace_with_same_ids(tiny_bench, "m.txt", "r.txt", RIVERS)
    assert btr._plan(QUESTION, corpus, params).adapter is None


def test_btr_storage_counts_one_decoder_and_deleting_reclaims(tiny_bench):
    """Adding a document re-fits the decoder and re-encodes every chunk: the superseded decoder and codes are
    deleted, not summed (one document's storage used to double). Deleting a document reclaims its bytes."""
    btr, store = get_method("btr"), tiny_bench.store
    params = btr_params()
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    btr.prepare(corpus, params)
    alone = btr.storage(corpus, params)
    assert alone.chunk_bytes > 0 and alone.shared["decoder"] > 0 and alone.tokens == corpus.n_tokens()
    add(tiny_bench, "t.txt", TOWER)
    btr.prepare(corpus, params)
    both = btr.storage(corpus, params)
    assert len(decoder_blobs(store)) == 1
    assert store.artifact_bytes(corpus.collection_id)["btr"] == both.total  # nothing superseded left behind
    per_doc = store.artifact_bytes_by_document(corpus.collection_id)
    assert sum(b for (_, m), b in per_doc.items() if m == "btr") == both.chunk_bytes
    assert tiny_bench.shared_storage()["btr"] == sum(both.shared.values())  # the Library's last row: the decoder
    assert both.chunk_bytes > alone.chunk_bytes and both.total < 2 * alone.total + both.chunk_bytes
    store.delete_document(corpus.collection_id, "t.txt")
    assert store.artifact_bytes(corpus.collection_id).get("btr", 0) < both.total
    btr.prepare(corpus, params)
    again = btr.storage(corpus, params)
    assert again.to_dict() == alone.to_dict()
    assert store.artifact_bytes(corpus.collection_id)["btr"] == alone.total


def test_btr_decoder_is_stored_in_fp16(tiny_bench):
    btr = get_method("btr")
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    btr.prepare(corpus, btr_params())
    (blob,) = decoder_blobs(tiny_bench.store)
    tensors = st_load(blob)
    d = corpus.lm.model.config.hidden_size
    assert tensors["weight"].dtype.name == "float16" and tensors["weight"].shape == (2 * d + 1, d)
    assert len(blob) < (2 * d + 1) * d * 2 + d * 4 + 200
    assert btr.storage(corpus, btr_params()).shared["decoder"] == len(blob)


def test_merged_codes_are_accounted_per_collection(tiny_bench):
    """Offline merging shares a codebook across the collection; its per-token figure used to sum the index
    artifacts of every collection in the store."""
    btr = get_method("btr")
    merged = btr_params(r_o=0.5)
    one = add(tiny_bench, "m.txt", MOUNTAINS, "one")
    two = add(tiny_bench, "r.txt", RIVERS + TOWER, "two")
    btr.prepare(one, merged)
    btr.prepare(two, merged)
    result = btr.answer(QUESTION, one, merged)
    account = btr.storage(one, merged)
    assert set(account.shared) == {"decoder", "codebook"}
    assert result.bytes_per_token == pytest.approx(account.bytes_per_token, rel=1e-3)
    assert result.chunk_bytes_per_token == pytest.approx(4.0)  # one uint32 code index per passage token
    assert tiny_bench.store.artifact_bytes(one.collection_id)["btr"] >= account.total


# --------------------------------------------------------------------------------------------- LLoCO

def test_lloco_adapter_is_not_reused_for_new_text(tiny_bench):
    lloco = get_method("lloco")
    params = lloco.Params(k=2, lora_steps=2)
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    lloco.finetune(corpus, params)
    assert lloco._context(QUESTION, corpus, params).adapter
    corpus = replace_with_same_ids(tiny_bench, "m.txt", "r.txt", RIVERS)
    assert lloco._context(QUESTION, corpus, params).adapter is None


def test_lloco_chunk_caches_are_not_reused_for_new_text(tiny_bench):
    """Guard: the compressed caches of the new chunks are the ones a fresh collection of that text computes."""
    import torch

    lloco = get_method("lloco")
    params = lloco.Params(k=2, c=2)
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    lloco.prepare(corpus, params)
    corpus = replace_with_same_ids(tiny_bench, "m.txt", "r.txt", RIVERS)
    assert lloco.storage(corpus, params).chunk_bytes == 0
    got = lloco._context("Where does the water go?", corpus, params)
    assert got.result.prepare_s > 0
    fresh = add(tiny_bench, "r.txt", RIVERS, "fresh")
    lloco.prepare(fresh, params)
    want = lloco._context("Where does the water go?", fresh, params)
    for mine, theirs in zip(got.cache.layers, want.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_lloco_library_bytes_agree_with_the_account(tiny_bench):
    lloco, store = get_method("lloco"), tiny_bench.store
    params = lloco.Params(k=2, lora_steps=2)
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    add(tiny_bench, "t.txt", TOWER)
    lloco.finetune(corpus, params)  # compresses every chunk, then trains the collection's adapter
    account = lloco.storage(corpus, params)
    assert account.chunk_bytes > 0 and account.shared["adapter"] > 0
    assert store.artifact_bytes(corpus.collection_id)["lloco"] == account.total
    per_doc = store.artifact_bytes_by_document(corpus.collection_id)
    assert sum(b for (_, m), b in per_doc.items() if m == "lloco") == account.chunk_bytes
    assert tiny_bench.shared_storage()["lloco"] == account.shared["adapter"]  # the Library's last row
    result = lloco.answer(QUESTION, corpus, params)
    assert result.bytes_per_token == pytest.approx(account.bytes_per_token, rel=1e-3)
    store.delete_document(corpus.collection_id, "t.txt")  # the adapter was trained on it: dropped
    after = lloco.storage(corpus, params)
    assert "adapter" not in after.shared and 0 < after.chunk_bytes < account.chunk_bytes
    assert store.artifact_bytes(corpus.collection_id)["lloco"] == after.total


def test_ingest_and_delete_report_what_the_collection_change_dropped(tiny_bench):
    """BTR's decoder is fit on every document, so adding or deleting one drops its artifacts: the upload and the
    delete say so, with the bytes; per-chunk artifacts (LLoCO's) are kept, unreported."""
    btr, lloco, params = get_method("btr"), get_method("lloco"), btr_params()
    corpus = add(tiny_bench, "m.txt", MOUNTAINS)
    btr.prepare(corpus, params)
    alone = btr.storage(corpus, params)
    reports = tiny_bench.ingest([("t.txt", TOWER.encode())], prepare=False)
    assert [r.status for r in reports] == ["added", "dropped"] and reports[1].name == "btr"
    assert f"btr: {fmt_bytes(alone.total)} it had built from all the previous documents was removed" in reports[1].message
    assert "Prepare builds it again" in reports[1].message
    assert "btr" not in tiny_bench.store.artifact_bytes(corpus.collection_id)
    btr.prepare(corpus, params)
    lloco.prepare(corpus, lloco.Params(k=2))
    doc = tiny_bench.delete("t.txt")
    assert len(doc["dropped"]) == 1 and doc["dropped"][0].startswith("btr: ")
    assert tiny_bench.store.artifact_bytes(corpus.collection_id)["lloco"] > 0  # m.txt's chunk caches stay
    btr.prepare(corpus, params)
    reports = tiny_bench.ingest([("r.txt", RIVERS.encode())], prepare=True)
    dropped = [r for r in reports if r.status == "dropped"]
    assert [r.name for r in dropped] == ["btr"]  # preparing at the default knobs does not rebuild these knobs' codes
