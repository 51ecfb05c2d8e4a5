"""Content changes against readers: a delete racing a Compare or a Prepare (threads, as the app's queues run
them), and a delete from another process in the middle of a BTR prepare."""
from __future__ import annotations

import threading
import time

import pytest

from ragdemo.store.db import StaleContent
from ragdemo.workbench import CompareListener, Workbench

BTR_ON_TINY = {"split": 2}
QUESTION = "Who built the tower?"


@pytest.fixture
def bench(tiny_settings, docs_dir) -> Workbench:
    bench = Workbench(tiny_settings.with_(max_new_tokens=3))
    bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    return bench


def _stale_artifacts(bench: Workbench) -> int:
    cid = bench.store.collection_id("class")
    return int(bench.store.value("SELECT COUNT(*) FROM artifacts WHERE basis IS NOT NULL AND basis != ?",
                                 (bench.store.content_signature(cid),)))


def _delete_in_thread(bench: Workbench, done: list) -> threading.Thread:
    def run():
        bench.delete("eiffel.txt", "class")
        done.append(time.perf_counter())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_delete_racing_a_compare_waits_and_every_method_sees_one_content(bench):
    cid = bench.store.collection_id("class")
    before = bench.store.content_signature(cid)
    seen, deleted, threads = [], [], []

    class Racing(CompareListener):
        def started(self, method):
            seen.append(bench.store.content_signature(cid))
            if not threads:  # the first method has started: a teacher deletes a document now
                threads.append(_delete_in_thread(bench, deleted))
            time.sleep(0.3)  # time enough for the delete to land, were it not held off

    results = bench.compare(QUESTION, ["closed_book", "rag", "full_context", "retro"], "class", listener=Racing())
    finished = time.perf_counter()
    threads[0].join(60)
    assert all(not r.error for r in results), [r.error for r in results]
    assert seen == [before] * 4  # one content from the first method to the last
    assert deleted and deleted[0] >= finished  # the delete waited for the Compare
    assert bench.store.content_signature(cid) != before and "eiffel.txt" not in {
        d["name"] for d in bench.documents("class")}
    assert all(s["doc"] != "eiffel.txt" for r in bench.ask(QUESTION, ["rag"], "class") for s in r.sources)


def test_a_delete_racing_a_btr_prepare_waits_and_leaves_no_stale_artifact(bench):
    deleted, threads = [], []

    def progress(fraction, message):
        if not threads:
            threads.append(_delete_in_thread(bench, deleted))
            time.sleep(0.3)

    bench.prepare(["btr"], "class", {"btr": BTR_ON_TINY}, progress)
    finished = time.perf_counter()
    threads[0].join(60)
    assert deleted and deleted[0] >= finished
    assert _stale_artifacts(bench) == 0


def test_a_delete_from_another_process_mid_prepare_stores_nothing_stale(bench):
    """The store itself refuses an artifact built for a content that changed before it was written (a delete
    by the CLI while the app prepares, or a ZeroGPU worker's prepare): no lock reaches across processes."""
    cid = bench.store.collection_id("class")
    calls = []

    def progress(fraction, message):
        calls.append(message)
        if len(calls) == 2:  # calibration has read the states of the old content
            bench.store.delete_document(cid, "eiffel.txt")  # not through the Workbench: as another process would

    with pytest.raises(StaleContent, match="run it again"):
        bench.prepare(["btr"], "class", {"btr": BTR_ON_TINY}, progress)
    assert _stale_artifacts(bench) == 0
    bench.prepare(["btr"], "class", {"btr": BTR_ON_TINY})  # run again: built for the content as it is now
    (result,) = bench.ask(QUESTION, ["btr"], "class", {"btr": BTR_ON_TINY})
    assert not result.error and result.prepare_s == 0 and _stale_artifacts(bench) == 0


def test_search_skips_a_chunk_deleted_after_the_index_was_read(bench, monkeypatch):
    corpus = bench.corpus("class", create=False)
    corpus.search([QUESTION], 3)  # the index is read and cached
    real = bench.store.chunks_by_id
    monkeypatch.setattr(bench.store, "chunks_by_id", lambda ids: dict(list(real(ids).items())[1:]))  # one is gone
    hits = corpus.search([QUESTION], 3)[0]
    assert len(hits) == 2
