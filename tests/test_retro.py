import pytest
import torch

import ragdemo.methods.retro as retro_module
from ragdemo.errors import UserError
from ragdemo.methods import get_method
from ragdemo.methods.retro import Retro, neighbour_passages

QUESTION = "When was the Eiffel Tower completed?"


@pytest.fixture
def corpus(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()])
    return tiny_bench.corpus()


def chunks_by_doc(corpus) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for chunk in sorted(corpus.chunks(), key=lambda c: (c["doc_id"], c["ord"])):
        out.setdefault(chunk["doc"], []).append(chunk)
    return out


def test_neighbours_carry_their_continuation(corpus):
    method = get_method("retro")
    texts = {d["name"]: d["text"] for d in corpus.documents()}
    per_doc = chunks_by_doc(corpus)
    assert len(per_doc["eiffel.txt"]) >= 2, "the fixture must give a document of several chunks"
    everything = method.Params(k=len(corpus.chunks()))
    found = method.neighbours(corpus, ["Eiffel tower"], everything)
    assert len(found) == len(corpus.chunks())
    for hit in found:
        siblings = per_doc[hit["doc"]]
        follow = hit["continuation"]
        if hit["ord"] == siblings[-1]["ord"]:
            assert follow is None  # the last chunk of a document has no continuation
            continue
        assert follow["doc_id"] == hit["doc_id"] and follow["ord"] == hit["ord"] + 1
        assert hit["text"] + follow["text"] in texts[hit["doc"]]  # [N, F] is contiguous text of one document
    off = method.neighbours(corpus, ["Eiffel tower"], method.Params(k=2, continuation=False))
    assert all(h["continuation"] is None for h in off)


def test_a_lone_neighbour_is_read_with_its_continuation(corpus, monkeypatch):
    first, second = chunks_by_doc(corpus)["eiffel.txt"][:2]
    monkeypatch.setattr(Retro, "search", lambda self, c, queries, k: [[{**first, "score": 0.9}] for _ in queries])
    method, lm = get_method("retro"), corpus.lm
    found = method.neighbours(corpus, [QUESTION], method.Params(k=1))
    passages = neighbour_passages(found)  # one passage per chunk, as every method reads them
    assert [p["text"] for p in passages] == [first["text"], second["text"]]
    assert [p["chunk_ids"] for p in passages] == [[first["chunk_id"]], [second["chunk_id"]]]
    prompt, _ = method.context(lm, QUESTION, found, "text", 10_000)
    bare, _ = method.context(lm, QUESTION, method.neighbours(corpus, [QUESTION], method.Params(k=1, continuation=False)),
                             "text", 10_000)
    assert len(prompt) > len(bare)
    assert second["text"].strip() in lm.tokenizer.decode(prompt.ids)
    assert second["text"].strip() not in lm.tokenizer.decode(bare.ids)


def test_question_is_split_into_chunks_of_lm_tokens(corpus):
    method, tokenizer = get_method("retro"), corpus.lm.tokenizer
    question = "Which fruit is yellow and grows in tropical regions of the world? " * 4
    n_tokens = len(tokenizer(question.strip(), add_special_tokens=False)["input_ids"])
    queries = method.question_queries(tokenizer, question, 16)
    assert len(queries) == -(-n_tokens // 16)
    found = method.neighbours(corpus, queries, method.Params(k=1, chunk_tokens=16))
    assert 1 <= len(found) <= len(queries)  # k per chunk, duplicates merged


def ask_retro(bench, max_new_tokens, **knobs):
    [result] = bench.ask(QUESTION, ["retro"], knobs={"retro": {"max_new_tokens": max_new_tokens, **knobs}})
    assert not result.error, result.error
    return result


@pytest.mark.parametrize("stride,expected_steps", [(4, [4, 8]), (5, [5, 10]), (64, [])])
def test_re_retrieval_every_stride_tokens(tiny_bench, corpus, stride, expected_steps):
    result = ask_retro(tiny_bench, 12, stride=stride)
    assert result.new_tokens == 12  # the tiny model does not stop early, so every step can happen
    kinds = [e["kind"] for e in result.events]
    assert kinds == ["question"] + ["re-retrieval"] * len(expected_steps)
    assert [e["step"] for e in result.events[1:]] == expected_steps
    for event in result.events:
        assert event["chunk_ids"] and isinstance(event["changed"], bool) and event["query"]
    # the documents are tiny: the same neighbours come back, so the KV cache is kept and nothing is re-prefilled
    assert all(not e["changed"] and "cache kept" in e["action"] for e in result.events[1:])
    assert result.processed_tokens + result.cached_tokens == result.prompt_tokens
    assert result.sources and result.retrieve_s > 0


def test_stride_below_four_is_refused(tiny_bench, corpus):
    with pytest.raises(UserError, match="stride"):
        tiny_bench.ask(QUESTION, ["retro"], knobs={"retro": {"stride": 2}})


def Scripted(corpus, plan: list[list[str]]):
    """A `Retro.search` whose call number i returns the chunks listed for it, so tests decide when neighbours change."""
    by_key = {f"{c['doc']}#{c['ord']}": c for c in corpus.chunks()}
    steps = [[{**by_key[key], "score": 0.5, "distance": 1.0} for key in step] for step in plan]
    calls = []

    def search(method, corpus, queries, k):
        hits = steps[min(len(calls), len(steps) - 1)]
        calls.append(queries)
        return [hits for _ in queries]

    return search


def spy_on_decoding(monkeypatch) -> list[dict]:
    """Record, for each answer, the logits behind every generated token and the run's final state."""
    runs: list[dict] = []
    real = retro_module.decode_loop

    def spying(lm, cache, first_logits, next_pos, max_new_tokens, t0, stream=None, sampling=None, step=None):
        seen = [first_logits[0, -1].clone()]

        def spy_step(token, pos, c):
            logits = step(token, pos, c)
            seen.append(logits[0, -1].clone())
            return logits

        generation = real(lm, cache, first_logits, next_pos, max_new_tokens, t0, stream, sampling, step=spy_step)
        runs.append({"ids": generation.ids, "logits": seen, "run": step.__self__})
        return generation

    monkeypatch.setattr(retro_module, "decode_loop", spying)
    return runs


def test_causality_nothing_before_a_retrieval_sees_it(tiny_bench, corpus, monkeypatch):
    runs = spy_on_decoding(monkeypatch)
    plan = [["eiffel.txt#0"], ["bananas.md#0"], ["bananas.md#1"]]
    other_third = [["eiffel.txt#0"], ["bananas.md#0"], ["eiffel.txt#1"]]
    for variant in (plan, other_third):
        monkeypatch.setattr(Retro, "search", Scripted(corpus, variant))
        result = ask_retro(tiny_bench, 12, k=1, stride=4, continuation=False)
        assert [e["changed"] for e in result.events] == [True, True, True]
    monkeypatch.setattr(Retro, "search", Scripted(corpus, plan))
    ask_retro(tiny_bench, 8, k=1, stride=4, continuation=False)  # stops before retrieval 2 (after token 8)
    a, b, short = runs
    # the logits behind tokens 1..8 were computed before retrieval 2, so they can't depend on what it returns
    for i in range(8):
        assert torch.equal(a["logits"][i], b["logits"][i]), f"token {i + 1} saw a later retrieval"
        assert torch.equal(a["logits"][i], short["logits"][i])
    assert a["ids"][:8] == b["ids"][:8] == short["ids"]
    # ...while the logits after it do change, so the comparison above can fail
    assert not torch.allclose(a["logits"][8], b["logits"][8])


def test_rebuilt_context_matches_a_fresh_prefill(tiny_bench, corpus, monkeypatch):
    """Re-prefilling after a swap keeps the KV cache only up to the first differing token; the logits must equal
    those of one plain forward pass over [new context][answer so far]."""
    runs = spy_on_decoding(monkeypatch)
    monkeypatch.setattr(Retro, "search", Scripted(corpus, [["bananas.md#0"], ["eiffel.txt#1"]]))
    result = ask_retro(tiny_bench, 6, k=1, stride=4)
    [spied] = runs
    run = spied["run"]
    assert result.events[1]["changed"] and "kept" in result.events[1]["action"]
    ids = run.prompt.ids + spied["ids"][:4]
    lm = corpus.lm
    with torch.inference_mode():
        fresh = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(fresh, spied["logits"][4], atol=1e-4)
    # the re-prefill happened after the first token: it is in its event, never in the answer's token fields
    swap = result.events[1]
    assert swap["prefilled_tokens"] == len(ids) - int(swap["action"].split("kept ")[1].split()[0])
    assert result.processed_tokens + result.cached_tokens == result.prompt_tokens
    assert result.prompt_tokens == sum(s["n_tokens"] for s in result.segments)  # the context at the first token
    assert not any(s["mark"] == "retrieved" for s in result.segments)
    assert {s["chunk_id"] for s in result.sources} >= {c["chunk_id"] for c in corpus.chunks()
                                                        if (c["doc"], c["ord"]) in {("bananas.md", 0), ("eiffel.txt", 1)}}


def test_nll_teacher_forces_the_gold_after_exactly_the_question_neighbours(corpus):
    from ragdemo.engine.prompt import build_prompt
    from ragdemo.engine.scoring import nll_of_answer

    method, lm = get_method("retro"), corpus.lm
    params = method.Params()
    found = method.neighbours(corpus, method.question_queries(lm.tokenizer, QUESTION, params.chunk_tokens), params)
    expected = nll_of_answer(lm, build_prompt(lm.tokenizer, QUESTION, neighbour_passages(found)).ids, "1889")
    assert method.nll(QUESTION, "1889", corpus, params) == pytest.approx(expected, rel=1e-5)
    # not the closed-book context, and the continuations are part of what is read
    closed = nll_of_answer(lm, build_prompt(lm.tokenizer, QUESTION, []).ids, "1889")
    assert expected != pytest.approx(closed, rel=1e-4)
    no_continuation = method.Params(continuation=False)
    assert method.nll(QUESTION, "1889", corpus, no_continuation) != pytest.approx(expected, rel=1e-4)
