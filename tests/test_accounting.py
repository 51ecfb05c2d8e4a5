"""One accounting rule for every registered method (GLOSSARY): at the first answer token
processed + cached = prompt, in token-layers / layers, and processed <= prompt.

The rule is checked against the mechanism, not against the method's own arithmetic: every key projection the
model runs is counted by a hook on each layer's `k_proj` (a full layer and CacheBlend's KV-only projection both
project keys once per token), so `processed_tokens` (+ `overhead_tokens`) x layers must equal what the model
computed before the first answer token. `prompt_tokens` is checked against RAG's prompt over the same chunks:
equal where the method keeps every token, smaller where it drops or merges some. Work after the first token
(RETRO's re-prefills) must be in the events, token for token.

A method added to the registry is run at its defaults automatically; VARIANTS adds the knobs that change its
accounting.
"""
from __future__ import annotations

import contextlib

import pytest

from ragdemo.methods import get_method, registry
from ragdemo.methods.base import params_from
from ragdemo.methods.retro import Retro

QUESTION = "When was the Eiffel Tower completed?"

# Knob sets that change how a method's tokens are counted, beside its defaults ({}).
VARIANTS: dict[str, list[dict]] = {
    "btr": [{"query_aware": False}, {"r_p": 0.3}, {"r_p": 0.3, "merge_mode": "every", "merge_layer": 2},
            {"split": 0, "bits": 16}],
    "cacheblend": [{"r": 0.0}, {"r": 1.0}, {"r": 0.3, "gradual": True}, {"selection_layer": 0}],
    "lingua": [{"question_aware": True}, {"ratio": 1.0}],
    "lloco": [{"c": 1}, {"c": 2, "positions": "compact"}],
    "jrt": [{"context": "full"}],
    "retro": [{"stride": 4}],
}


# Defaults that do not fit the 4-layer test model.
TINY_MODEL = {"btr": {"split": 2}}


def cases() -> list[tuple[str, dict]]:
    return [(name, {**TINY_MODEL.get(name, {}), **knobs}) for name in registry()
            for knobs in [{}] + VARIANTS.get(name, [])]


def case_id(case) -> str:
    name, knobs = case
    return name + "".join(f"@{k}={v}" for k, v in knobs.items())


class KeyProjections:
    """Counts the token rows every layer's key projection sees: token-layers computed, whatever the path."""

    def __init__(self, lm):
        self.rows = 0
        self.handles = [layer.self_attn.k_proj.register_forward_hook(self._count) for layer in lm.model.model.layers]

    def _count(self, module, inputs, output):
        self.rows += inputs[0].shape[:-1].numel()

    def close(self):
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def counting(lm):
    counter = KeyProjections(lm)
    try:
        yield counter
    finally:
        counter.close()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_model_dir):
    from tests.conftest import EIFFEL, FILLER, make_settings
    from ragdemo.workbench import Workbench

    home = tmp_path_factory.mktemp("accounting")
    workbench = Workbench(make_settings(home / "home", tiny_model_dir, max_new_tokens=8))
    docs = [("eiffel.txt", (EIFFEL * 3).encode()), ("bananas.md", ("# Bananas\n\n" + FILLER * 4).encode())]
    workbench.ingest(docs, prepare=False)
    workbench.warm()
    return workbench


def answer(bench, name: str, knobs: dict, max_new_tokens: int = 1):
    corpus = bench.corpus()
    method = get_method(name)
    params = params_from(method.Params, {**knobs, "max_new_tokens": max_new_tokens})
    if method.has_prepare:
        method.prepare(corpus, params)
    with corpus.lm.lock:
        method.answer(QUESTION, corpus, params)  # first use: prefix caches, decoders, adapters read once
        corpus.lm.prefix_cache = None  # the shared prefix computed again: the "processed" path is checked too
        with counting(corpus.lm) as cold:
            first = method.answer(QUESTION, corpus, params)
        with counting(corpus.lm) as warm:
            second = method.answer(QUESTION, corpus, params)
    return (first, cold.rows), (second, warm.rows)


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_processed_plus_cached_is_the_prompt_and_processed_is_what_ran(bench, case):
    name, knobs = case
    layers = bench.models.lm.n_layers
    for result, rows in answer(bench, name, knobs):
        assert not result.error, result.error
        assert result.prepare_s == 0, "artifacts were prepared before: nothing is built inside the answer"
        assert result.processed_tokens + result.cached_tokens == pytest.approx(result.prompt_tokens, abs=0.02)
        assert result.processed_tokens <= result.prompt_tokens + 1e-6
        assert (result.processed_tokens + result.overhead_tokens) * layers == pytest.approx(rows, abs=0.05 * layers)
        # the panel and the card read the same segments: their shares add up to the fields
        assert sum(s["processed"] for s in result.segments) == pytest.approx(result.processed_tokens, abs=0.05)
        assert sum(s["cached"] for s in result.segments) == pytest.approx(result.cached_tokens, abs=0.05)


@pytest.mark.parametrize("case", [c for c in cases() if c[0] not in ("closed_book", "full_context", "jrt", "retro")
                                  and c[1].get("context") != "full"], ids=case_id)
def test_prompt_is_rags_prompt_over_the_same_chunks_less_what_is_dropped(bench, case):
    name, knobs = case
    [(rag, _), _] = answer(bench, "rag", {"k": 5})
    [(result, _), _] = answer(bench, name, knobs)
    lead = len(bench.models.lm.tokenizer(f"Question: {QUESTION}\n\n", add_special_tokens=False)["input_ids"])
    aware = name == "btr" and params_from(get_method(name).Params, knobs).query_aware  # BTR's default layout
    expected = rag.prompt_tokens + (lead if aware else 0)
    # nothing dropped or merged: exactly RAG's tokens (BTR's query-aware layout adds one question copy on top)
    keeps_all = (name in ("rag", "cacheblend") or (name == "btr" and not knobs.get("r_p"))
                 or (name == "lingua" and knobs.get("ratio") == 1.0) or (name == "lloco" and knobs.get("c") == 1))
    if keeps_all:
        assert result.prompt_tokens == pytest.approx(expected, abs=0.02)
    else:
        assert result.prompt_tokens < expected


def test_retro_work_after_the_first_token_is_in_its_events_token_for_token(bench, monkeypatch):
    """stride 4 over 12 tokens re-retrieves twice; the neighbours are swapped each time (the search is made to
    alternate), so the context is re-prefilled, and every re-prefilled token is in the events, not the fields."""
    corpus = bench.corpus()
    chunks = sorted(corpus.chunks(), key=lambda c: c["chunk_id"])
    calls = {"n": 0}

    def alternating(self, corpus, queries, k):
        calls["n"] += 1
        picked = chunks[calls["n"] % 2::2][:k]
        return [[{**c, "score": 0.5} for c in picked] for _ in queries]

    monkeypatch.setattr(Retro, "search", alternating)
    lm = corpus.lm
    method = get_method("retro")
    params = params_from(method.Params, {"stride": 4, "k": 1, "max_new_tokens": 12})
    with lm.lock:
        [first_only] = [method.answer(QUESTION, corpus, params_from(method.Params, {"stride": 4, "k": 1,
                                                                                    "max_new_tokens": 1}))]
        calls["n"] = 0
        with counting(lm) as whole:
            result = method.answer(QUESTION, corpus, params)
    swaps = [e for e in result.events if e["kind"] == "re-retrieval" and e["changed"]]
    assert len(swaps) == 2 and result.new_tokens == 12
    assert result.processed_tokens == first_only.processed_tokens  # later work never enters the fields
    assert result.retrieve_s == pytest.approx(result.events[0]["retrieve_s"], abs=1e-5)  # the question's only
    steps = result.new_tokens - 1  # one decode step after every token but the last
    after_first = steps + sum(e["prefilled_tokens"] - 1 for e in swaps)  # a swap re-prefills instead of one step
    assert whole.rows == pytest.approx((result.processed_tokens + after_first) * lm.n_layers, abs=0.1 * lm.n_layers)
    assert all(e["prefilled_tokens"] > 1 and e["prefill_s"] > 0 for e in swaps)


def card_and_panel_figures(result) -> tuple[dict, dict]:
    """The token figures as the card shows them and as "what the model sees" shows them (their data attributes)."""
    import re

    from ragdemo.ui.render import Card, render_card, render_model_sees

    card = render_card(Card(result.method, result.method, status="done", result=result))
    shown = {m: float(v) for m, v in re.findall(r"data-metric='(\w+)' data-value='([^']+)'", card)}
    panel = render_model_sees([result])
    totals = re.search(r"data-prompt='([^']+)' data-processed='([^']+)' data-cached='([^']+)'", panel)
    kept = re.search(r"data-kept='([^']+)'", panel)
    return ({k: shown[k] for k in ("prompt_tokens", "processed_tokens", "cached_tokens")},
            {"prompt_tokens": float(totals[1]), "processed_tokens": float(totals[2]), "cached_tokens": float(totals[3]),
             "kept": float(kept[1]) if kept else None})


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_card_panel_json_and_bench_show_the_same_figures(bench, case):
    import re

    from ragdemo.bench.datasets import Question
    from ragdemo.bench.runner import MethodSpec, _ask_one

    name, knobs = case
    _, (result, _) = answer(bench, name, knobs, max_new_tokens=4)  # the warm answer: the bench's are warm too
    card, panel = card_and_panel_figures(result)
    for field in card:
        assert card[field] == panel[field] == pytest.approx(getattr(result, field))
    assert result.to_dict()["prompt_tokens"] == result.prompt_tokens  # ask --json is the record itself
    said = [re.search(r"(\d[\d,.]*) of (\d[\d,]*) passage tokens kept", note) for note in result.notes]
    said = [m for m in said if m]
    if said:  # the note on the card and the panel's kept count are one figure
        assert panel["kept"] == pytest.approx(float(said[0][1].replace(",", "")), abs=0.5)
    row = _ask_one(MethodSpec(name, name, knobs), Question("q", QUESTION, ["1889"]), bench.corpus(), 4)
    for field in ("prompt_tokens", "processed_tokens", "cached_tokens", "overhead_tokens"):
        assert row[field] == pytest.approx(getattr(result, field), abs=0.02), field
