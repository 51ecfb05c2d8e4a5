"""ZeroGPU, as far as it can be checked without it: every handler that runs the model asks for a GPU with a bounded
duration; the decorated handlers work where `spaces.GPU` does nothing; and the work runs in a forked worker
process, as ZeroGPU runs each GPU call, with the same results and the same stored artifacts as in this process."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from ragdemo.ui import build_app, gpu
from ragdemo.workbench import Workbench

from .conftest import make_settings

# events that run the model: Compare, an upload's preparation, Prepare, fine-tuning, the benchmark, the demo's
# preparation, Settings (loads and warms a model)
GPU_EVENTS = {"compare", "prepare_upload", "prepare", "finetune", "bench", "prepare_demo"}
QUESTION = "Who built the tower?"
METHODS = ["closed_book", "rag", "lloco", "cacheblend"]


def _fns(app):
    return app.fns.values() if isinstance(app.fns, dict) else app.fns


def test_every_model_running_handler_asks_zerogpu_for_a_bounded_gpu(tiny_bench):
    app = build_app(tiny_bench)
    named = {block_fn.api_name: block_fn for block_fn in _fns(app) if block_fn.api_name}
    assert GPU_EVENTS <= set(named), GPU_EVENTS - set(named)
    model_queue = [f for f in _fns(app) if f.concurrency_id == "model"]
    needing = [named[name] for name in GPU_EVENTS] + model_queue
    missing = sorted({f.api_name or f.name for f in needing if not hasattr(f.fn, "gpu_grant")})
    assert not missing, f"handlers that run the model without @spaces.GPU: {missing}"
    for block_fn in needing:
        grant = block_fn.fn.gpu_grant
        seconds = grant.seconds(*[None] * 16)  # whatever the inputs, within the bounds
        assert gpu.FLOOR_S <= seconds <= grant.cap_s <= gpu.JOB_CAP_S
    # content changes stay in this process, one at a time with the long jobs
    for name in ("upload", "load_demo"):
        assert named[name].concurrency_id == "long" and not hasattr(named[name].fn, "gpu_grant")


def test_the_compare_grant_follows_the_apps_own_timing(tiny_bench, docs_dir):
    app = build_app(tiny_bench)
    grant = next(f for f in _fns(app) if f.api_name == "compare").fn.gpu_grant
    untimed = grant.seconds(QUESTION, ["rag", "closed_book"])
    assert untimed == min(gpu.COMPARE_CAP_S, 2 * gpu.UNTIMED_ANSWER_S + gpu.MARGIN_S)
    tiny_bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    tiny_bench.ask(QUESTION, ["rag", "closed_book"], "class")  # now timed on this machine (a tiny model: fast)
    assert gpu.FLOOR_S <= grant.seconds(QUESTION, ["rag", "closed_book"]) < untimed
    assert grant.deadline(QUESTION, ["rag"]).limited is False  # no grant to stay inside off ZeroGPU


def test_the_decorated_compare_handler_runs_without_zerogpu(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    app = build_app(tiny_bench)
    compare = next(f for f in _fns(app) if f.api_name == "compare")
    knob_defaults = [c.value for c in compare.inputs[4:]]
    *_, (cards, chart, sees, sources, history, status, *_) = compare.fn(QUESTION, ["rag", "closed_book"], "class", "",
                                                                     *knob_defaults)
    assert cards.count("data-method=") == 2 and "internal error" not in cards and len(history) == 2


# ----------------------------------------------------------------------------------- forked workers
def _in_fork(work):
    """Run `work()` in a child forked from this process (ZeroGPU forks its GPU workers from the app's process)
    and return what it returned, or raise what it raised."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child():
        try:
            send.send(("ok", work()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            send.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(0)

    process = context.Process(target=child)
    process.start()
    if not receive.poll(600):  # a lock inherited held would block the worker for ever
        process.kill()
        raise AssertionError("the forked worker did not finish in 10 minutes")
    kind, value = receive.recv()
    process.join(60)
    if kind == "error":
        raise AssertionError(f"in the forked worker: {value}")
    return value


def _artifacts(bench: Workbench) -> set[tuple]:
    """What is stored, by key and size: the bytes themselves differ in the last bits even between two runs in one
    process (measured: 4 of the cacheblend and lloco blobs here), so they cannot be compared bit for bit."""
    rows = bench.store.rows("SELECT method, params_hash, key, nbytes FROM artifacts")
    return {(r["method"], r["params_hash"], r["key"], r["nbytes"]) for r in rows}


def _answers(results) -> list[tuple]:
    return [(r["method"], r["answer"], r["error"], r["prompt_tokens"]) for r in results]


def _bench(home, tiny_model_dir, docs_dir) -> Workbench:
    bench = Workbench(make_settings(home, tiny_model_dir, max_new_tokens=6))
    bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    return bench


@pytest.fixture
def one_cpu_thread():
    """A forked worker computes with one CPU thread (ragdemo/forks.py says why); the reference runs with one
    thread too, so both round their float sums alike."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compare_and_prepare_in_forked_workers_match_this_process(tmp_path, tiny_model_dir, docs_dir, one_cpu_thread):
    here = _bench(tmp_path / "here", tiny_model_dir, docs_dir)
    here.warm("class")  # as the app's process below: the same caches before the same work
    prepared_here = here.prepare(["lloco", "cacheblend"], "class")
    answered_here = [r.to_dict() for r in here.compare(QUESTION, METHODS, "class")]

    forked = _bench(tmp_path / "forked", tiny_model_dir, docs_dir)
    forked.warm("class")  # the app's process has used the model, its store and its locks before any fork
    prepared = _in_fork(lambda: forked.prepare(["lloco", "cacheblend"], "class"))
    first = _in_fork(lambda: [r.to_dict() for r in forked.compare(QUESTION, METHODS, "class")])
    second = _in_fork(lambda: [r.to_dict() for r in forked.compare(QUESTION, METHODS, "class")])  # a fresh worker

    assert [line.split(" (")[0] for line in prepared] == [line.split(" (")[0] for line in prepared_here]
    assert _answers(first) == _answers(second) == _answers(answered_here)
    assert all(not r["error"] and r["prepare_s"] == 0 for r in first)  # the workers read what Prepare stored
    assert _artifacts(forked) == _artifacts(here)  # the workers' artifacts landed in the store, the same ones
    assert len(forked.runs("class")) == 2 * len(METHODS)  # both workers' runs were recorded
    # the app's process goes on as before: its connection, locks and model were never used by the workers
    (after,) = forked.compare(QUESTION, ["rag"], "class")
    assert (after.answer, after.prompt_tokens) == next((r.answer, r.prompt_tokens) for r in
                                                       here.compare(QUESTION, ["rag"], "class"))


def test_a_fork_inherits_no_held_lock(tmp_path, tiny_model_dir, docs_dir):
    """ZeroGPU forks while other threads of the app may hold the model, the store or the content lock: the
    worker must not wait forever for a holder that does not exist in it."""
    import threading

    bench = _bench(tmp_path / "home", tiny_model_dir, docs_dir)
    held, release = threading.Event(), threading.Event()

    def hold_everything():
        with bench.content.reading(), bench.models.lm.lock, bench.store.lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_everything)
    holder.start()
    held.wait(60)
    try:
        (result,) = _in_fork(lambda: [r.to_dict() for r in bench.compare(QUESTION, ["rag"], "class")])
        deleted = _in_fork(lambda: bench.delete("bananas.md", "class")["name"])
    finally:
        release.set()
        holder.join(60)
    assert not result["error"] and deleted == "bananas.md"


def test_a_decorated_handler_on_zerogpu_holds_the_content_lock_while_its_worker_runs(tiny_bench, monkeypatch):
    """With `spaces.GPU` sending the call to another process (faked here with a fork), this process holds the
    content lock meanwhile, so a delete here waits for the worker's Compare."""
    import spaces

    seen = []

    def fake_gpu(duration=None):
        def wrap(fn):
            def in_worker(*args, **kwargs):
                seen.append((duration(*args, **kwargs), tiny_bench.content._readers))
                return _in_fork(lambda: fn(*args, **kwargs))
            return in_worker
        return wrap

    monkeypatch.setattr(spaces, "GPU", fake_gpu)
    grant = gpu.GpuGrant(lambda *a: 30.0, gpu.COMPARE_CAP_S)
    handler = gpu.on_gpu(tiny_bench.content, grant)(lambda x: ("done", x))
    assert handler(7) == ("done", 7) and seen == [(40, 1)] and tiny_bench.content._readers == 0
    assert handler.gpu_grant is grant


def test_cancel_pressed_in_the_app_reaches_a_job_in_a_forked_worker(tmp_path):
    """ZeroGPU runs Prepare in a forked worker: the Cancel click is handled in the app's process."""
    import time

    from ragdemo.ui.common import Cancelled, Jobs, cancellable

    jobs = Jobs(tmp_path / "jobs")
    jobs.start("visitor", "prepare")

    def job():  # as run_job does inside the decorated handler, in the worker
        step = cancellable(None, jobs.flag("visitor", "prepare"))
        for i in range(600):
            try:
                step(i / 600, "a step")
            except Cancelled:
                return f"cancelled at step {i}"
            time.sleep(0.05)
        return "never cancelled"

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=lambda: send.send(job()))
    worker.start()
    time.sleep(1.0)
    assert jobs.cancel("visitor", "prepare")  # the Cancel button, in the app's process
    assert receive.poll(30) and receive.recv().startswith("cancelled at step")
    worker.join(30)
    jobs.finish("visitor", "prepare")
    assert not list((tmp_path / "jobs").iterdir())  # nothing left to cancel the next job
