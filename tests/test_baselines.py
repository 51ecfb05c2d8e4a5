import pytest

from ragdemo.methods import get_method, registry
from ragdemo.methods.base import Result, params_from
from ragdemo.workbench import Workbench

FIELDS = ["method", "answer", "prompt_tokens", "processed_tokens", "cached_tokens", "retrieve_s", "load_s", "ttft_s",
          "decode_s", "total_s", "decode_tok_s", "storage_bytes", "bytes_per_token", "sources", "events", "notes"]


def test_result_has_every_design_field():
    data = Result("x").to_dict()
    assert all(f in data for f in FIELDS)
    assert Result.from_dict({**data, "unknown": 1}).method == "x"


def test_registry_finds_baselines():
    assert {"closed_book", "full_context", "rag"} <= set(registry())


def test_params_from_coerces_strings_and_refuses_unknown_knobs():
    from ragdemo.errors import UserError

    params = params_from(get_method("rag").Params, {"k": "3"})
    assert params.k == 3
    with pytest.raises(UserError, match="unknown knob 'bogus' for rag"):
        params_from(get_method("rag").Params, {"k": "3", "bogus": 1}, "rag")


def test_baselines_on_tiny_model(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    streamed = {}
    results = tiny_bench.ask("When was the Eiffel Tower completed?", ["closed_book", "full_context", "rag"],
                             knobs={"rag": {"k": 2}}, stream=lambda m, t: streamed.setdefault(m, []).append(t))
    closed, full, rag = results
    assert closed.prompt_tokens < rag.prompt_tokens < full.prompt_tokens
    assert closed.sources == [] and len(rag.sources) >= 1 and rag.retrieve_s > 0
    assert all(r.ttft_s > 0 and r.total_s >= r.ttft_s and r.processed_tokens + r.cached_tokens == r.prompt_tokens
               for r in results)
    assert rag.cached_tokens == rag.segments[0]["n_tokens"]  # full_context's answer cached the shared prefix
    assert all(r.new_tokens <= 8 for r in results)
    for r in results:
        assert "".join(streamed.get(r.method, [])).strip() == r.answer
    assert len(tiny_bench.runs()) == 3


def test_rag_reads_one_passage_per_chunk_in_document_order(tiny_bench, docs_dir):
    """The layout every reuse method stores: one passage per chunk; `join` (a measured study) joins touching ones."""
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    corpus = tiny_bench.corpus()
    method = get_method("rag")
    every = len(corpus.chunks())
    prompt, _ = method.build("bananas potassium", corpus, method.Params(k=every))
    passages = [s for s in prompt.segments if s.kind == "passage"]
    assert len(passages) == every
    order = [(s.source["doc"], s.source["chunk_id"]) for s in passages]
    by_doc = {d["name"]: d["id"] for d in tiny_bench.documents()}
    assert order == sorted(order, key=lambda o: (by_doc[o[0]], o[1]))  # documents in upload order, chunks in order
    joined, _ = method.build("bananas potassium", corpus, method.Params(k=every, join=True))
    assert len([s for s in joined.segments if s.kind == "passage"]) == 2  # every chunk retrieved: one per document


def test_full_context_truncates_with_a_note(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    [result] = tiny_bench.ask("Where is the tower?", ["full_context"], knobs={"full_context": {"max_context_tokens": 60}})
    assert result.prompt_tokens <= 60
    assert any("truncated to 60 tokens" in n for n in result.notes)


def test_methods_needing_documents_say_so(tiny_bench):
    from ragdemo.errors import UserError

    tiny_bench.store.collection_id("default")
    with pytest.raises(UserError, match="empty"):
        tiny_bench.ask("Anything?", ["rag"])


def test_baselines_answer_with_the_real_default_model(default_settings, docs_dir):
    bench = Workbench(default_settings)
    bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    results = bench.ask("In which year was the Eiffel Tower completed?", ["closed_book", "full_context", "rag"])
    for r in results:
        assert r.answer and r.model.startswith("SmolLM2-135M")
    assert "1889" in results[1].answer and "1889" in results[2].answer
