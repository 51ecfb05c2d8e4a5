"""Warm start and preparation outside the answer's clock (issue: cold start and one-time preparation landed
inside TTFT, so a method's TTFT depended on whether it ran first)."""
from __future__ import annotations

from ragdemo.methods import get_method, registry
from ragdemo.methods.rag import Rag


TINY_KNOBS = {"btr": {"split": "2"}}
# BTR prepares the collection on first use; the per-chunk methods hand their missing chunks to the shared pass
BUILDERS = {"btr": "prepare"}  # the tiny model has 4 layers; BTR's default split is 6


def _ingest(bench, docs_dir, **kwargs):
    return bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], **kwargs)


def test_ask_warms_model_embedder_and_index_before_the_first_timed_answer(tiny_bench, docs_dir, monkeypatch):
    _ingest(tiny_bench, docs_dir)
    fresh = type(tiny_bench)(tiny_bench.settings)  # a new process's workbench: nothing warmed yet
    seen = {}
    original = Rag.answer

    def spy(self, question, corpus, params, stream=None):
        seen["model_warm"] = id(corpus.lm) in fresh._warm_models
        seen["index_in_memory"] = any(key[0] == corpus.collection_id for key in fresh.indexes._memory)
        return original(self, question, corpus, params, stream)

    monkeypatch.setattr(Rag, "answer", spy)
    fresh.ask("When was the tower completed?", ["rag"], record=False)
    assert seen == {"model_warm": True, "index_in_memory": True}


def test_warm_runs_once_per_model_and_collection(tiny_bench, docs_dir, monkeypatch):
    _ingest(tiny_bench, docs_dir)
    fresh = type(tiny_bench)(tiny_bench.settings)
    calls = []
    monkeypatch.setattr("ragdemo.workbench.warm_model", lambda lm: calls.append(lm) or 0.0)
    first = fresh.warm()
    second = fresh.warm()
    assert first.done == ["model", "collection"] and second.done == []
    assert len(calls) == 1


def test_ingest_with_prepare_builds_every_default_artifact_so_answers_prepare_nothing(tiny_bench, docs_dir):
    reports = _ingest(tiny_bench, docs_dir, prepare=True)
    prepared = {r.name for r in reports if r.status == "prepared"}
    skipped = {r.name: r.message for r in reports if r.status == "skipped"}
    assert prepared | set(skipped) == {name for name, m in registry().items() if m.has_prepare}
    assert set(skipped) <= {"btr"} and all("split" in m for m in skipped.values())  # split 6 > the tiny 4 layers
    assert "lloco" in prepared
    for name in sorted(prepared):
        (result,) = tiny_bench.ask("When was the tower completed?", [name], record=False)
        assert not result.error, result.error
        assert result.prepare_s == 0.0, (name, result.notes)


def test_preparation_on_first_use_goes_to_prepare_s_never_into_ttft(tiny_bench, docs_dir, monkeypatch):
    import time

    reports = _ingest(tiny_bench, docs_dir)
    assert all(r.status == "added" for r in reports)
    slow = 6.0  # seconds added to every artifact build: far above what the tiny model's answer takes, even under load
    for name, method in registry().items():
        if not method.has_prepare:
            continue
        builder = BUILDERS.get(name, "pass_job")  # what the answer path calls when an artifact is missing
        original = getattr(method, builder)

        def slow_build(self, *args, _original=original, **kwargs):
            time.sleep(slow)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(method, builder, slow_build)
        (result,) = tiny_bench.ask("When was the tower completed?", [name], knobs=TINY_KNOBS, record=False)
        assert not result.error, (name, result.error)
        assert result.prepare_s >= slow, (name, result.prepare_s)
        assert result.ttft_s < slow and result.total_s < slow and result.load_s < slow, (name, result)
        params = get_method(name).Params(**{k: int(v) for k, v in TINY_KNOBS.get(name, {}).items()})
        account = get_method(name).storage(tiny_bench.corpus(), params)
        assert account.total > 0 and account.tokens == tiny_bench.corpus().n_tokens(), name


def test_warm_up_fills_every_shared_prefix_so_no_answer_computes_one(tiny_lm):
    from ragdemo.engine.prefix import prefix_cache
    from ragdemo.engine.prompt import shared_prefixes
    from ragdemo.engine.warmup import warm_model

    warm_model(tiny_lm)
    assert all(prefix_cache(tiny_lm).has(tiny_lm, ids) for ids in shared_prefixes(tiny_lm.tokenizer))
