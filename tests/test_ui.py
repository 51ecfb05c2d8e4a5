"""Fast UI tests: the HTML rendering helpers and the Gradio handlers called directly on a tiny workbench."""
from __future__ import annotations

import re

import gradio as gr
import pytest

from ragdemo.methods import registry
from ragdemo.methods.base import Result
from ragdemo.ui import build_app
from ragdemo.ui import ask, library, settings
from ragdemo.ui.knobs import KnobSet, knob_defaults
from ragdemo.ui.render import (Card, comparison_figure, document_table, fmt_bytes, highlight_match, render_cards,
                               render_model_sees, render_sources)

EVIL = "<script>alert('x')</script>"


def result(method="rag", **kw) -> Result:
    base = dict(answer="Paris, 1889.", model="tiny", prompt_tokens=120, processed_tokens=80.5, cached_tokens=40,
                new_tokens=5, retrieve_s=0.01, ttft_s=0.2, decode_s=0.3, total_s=0.5, decode_tok_s=13.3,
                storage_bytes=2048, segments=[{"kind": "prefix", "mark": "text", "text": "Context:\n", "n_tokens": 3},
                                              {"kind": "passage", "mark": "cached", "text": "The tower.", "n_tokens": 3,
                                               "source": {"doc": "a.txt", "chunk_id": 1}},
                                              {"kind": "question", "mark": "text", "text": "Q?", "n_tokens": 2}])
    base.update(kw)
    return Result(method, **base)


# ----------------------------------------------------------------- rendering
def test_card_shows_answer_and_every_number():
    html = render_cards([Card("rag", "Top-k RAG", "done", result=result())])
    assert "Paris, 1889." in html and "data-status='done'" in html
    for field in ("prompt_tokens", "processed_tokens", "cached_tokens", "retrieve_s", "load_s", "ttft_s", "decode_s",
                  "total_s", "decode_tok_s", "storage_bytes"):
        assert f"data-metric='{field}'" in html
    assert "80.5" in html and "2.0 kB" in html and "200 ms" in html


def test_card_shows_error_and_notes():
    html = render_cards([Card("btr", "BTR", "done", result=Result("btr", error="not supported for mamba",
                                                                    notes=["context truncated"]))])
    assert "rd-error" in html and "not supported for mamba" in html and "context truncated" in html
    assert "rd-metric" not in html  # no numbers for a method that did not run


def test_streaming_card_shows_partial_text():
    card = Card("rag", "RAG", "running")
    card.push("Par")
    card.push("is")
    html = render_cards([card])
    assert "Paris" in html and "data-status='running'" in html


def test_everything_rendered_escapes_html():
    evil = result(answer=EVIL, notes=[EVIL], error="", events=[{"step": 1, "query": EVIL}],
                  segments=[{"kind": "passage", "mark": "text", "text": EVIL, "n_tokens": 9, "source": {"doc": EVIL}}],
                  sources=[{"doc": EVIL, "chunk_id": 7, "score": 0.5}])
    outputs = [render_cards([Card("rag", EVIL, "done", result=evil)]),
               render_model_sees([evil], {"rag": EVIL}),
               render_sources([evil], {7: EVIL + " more text."}, EVIL)]
    for html in outputs:
        assert "<script>" not in html
        assert "&lt;script&gt;" in html
    assert "<script>" not in render_cards([Card("rag", "x", "done", result=Result("rag", error=EVIL))])


def test_model_sees_colours_segments_by_mark_with_legend_and_events():
    plain = result("full_context", segments=[{"kind": "passage", "mark": "text", "text": "abc", "n_tokens": 10}])
    cached = result("lloco", segments=[{"kind": "passage", "mark": "compressed", "text": "abc", "n_tokens": 4},
                                       {"kind": "passage", "mark": "brand_new_mark", "text": "d", "n_tokens": 1}],
                    events=[{"at_token": 64, "retrieved": "chunk 3"}])
    html = render_model_sees([plain, cached])
    assert html.count("class='rd-sees'") == 2
    assert "data-mark='text'" in html and "data-mark='compressed'" in html and "data-mark='brand_new_mark'" in html
    assert "rd-legend" in html and "binarized" in html and "brand_new_mark" in html  # unknown marks join the legend
    assert "rd-events" in html and "chunk 3" in html


def test_model_sees_draws_token_boundaries_with_a_tokenizer(tiny_lm):
    r = result(segments=[{"kind": "question", "mark": "text", "text": "Where is the tower?", "n_tokens": 5}])
    html = render_model_sees([r], tokenizer=tiny_lm.tokenizer)
    pieces = tiny_lm.tokenizer("Where is the tower?", add_special_tokens=False)["input_ids"]
    assert html.count("border-right:1px solid") == len(pieces)


def test_sources_highlight_the_matching_sentence():
    text = "Bananas are yellow. The Eiffel Tower was completed in 1889. Paris is in France."
    html = highlight_match(text, "When was the Eiffel Tower completed?")
    assert "<mark class='rd-match'" in html
    assert html.split("<mark")[1].split("</mark>")[0].endswith("The Eiffel Tower was completed in 1889.")
    r = result(sources=[{"doc": "a.txt", "chunk_id": 3, "chunk_ids": [3, 4], "score": 0.8}])
    html = render_sources([r], {3: "Part one about towers. ", 4: "Part two."}, "towers")
    assert "a.txt" in html and "Part one about towers." in html and "Part two." in html and "3, 4" in html
    whole = result(sources=[{"doc": "a.txt"}], segments=[{"kind": "passage", "mark": "text", "text": "All of a.txt here.",
                                                         "n_tokens": 5, "source": {"doc": "a.txt"}}])
    html = render_sources([whole], {}, "a.txt")
    assert "whole document" in html and "All of a.txt here." in re.sub("<[^>]+>", "", html)


def test_chart_and_tables():
    figure = comparison_figure([result("closed_book", storage_bytes=0), result("rag"), Result("x", error="boom")])
    assert len(figure.axes) == 3
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["closed_book", "rag"]
    assert comparison_figure([Result("x", error="boom")]) is None
    headers, rows = document_table([{"id": 1, "name": "a.txt", "n_tokens": 10, "n_chunks": 1, "size": 1500,
                                     "storage": {"btr": 4000}}])
    assert headers[-1] == "btr storage" and rows[0][-1] == "4.0 kB"
    headers, rows = document_table([{"id": 1, "name": "a.txt", "n_tokens": 10, "n_chunks": 1, "size": 1, "storage": {}}],
                                   ["lloco"])
    assert headers[-1] == "lloco storage" and rows[0][-1] == "0 B"  # preparable methods always get a column
    assert fmt_bytes(0) == "0 B" and fmt_bytes(2_500_000) == "2.5 MB"


# --------------------------------------------------------------------- knobs
def test_knobs_come_from_every_registered_method():
    with gr.Blocks():
        knobs = KnobSet()
        knobs.build()
    names = {(k.method, k.name) for k in knobs.knobs}
    for name, cls in registry().items():
        for knob, _ in knob_defaults(cls.Params):
            assert (name, knob) in names
    values = [k.default for k in knobs.knobs]
    shared = [i for i, k in enumerate(knobs.knobs) if k.name == "max_new_tokens"]
    values = [(0 if i % 2 else None) if i in shared else v for i, v in enumerate(values)]  # 0/blank -> Settings value
    rag_k = next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == ("rag", "k"))
    values[rag_k] = 2.0  # gr.Number hands back floats
    parsed = knobs.values(*values)
    assert parsed["rag"]["k"] == 2 and isinstance(parsed["rag"]["k"], int)
    assert all("max_new_tokens" not in v for v in parsed.values())
    values[shared[0]] = 7.0
    assert knobs.values(*values)[knobs.knobs[shared[0]].method]["max_new_tokens"] == 7


# ------------------------------------------------------------------ handlers
def _paths(docs_dir):
    return [str(docs_dir / "eiffel.txt"), str(docs_dir / "bananas.md")]


def test_upload_lists_documents_and_delete_removes_one(tiny_bench, docs_dir):
    status, cleared, table, picker, _ = library.upload(tiny_bench, _paths(docs_dir), "demo")
    assert "eiffel.txt" in status and "bananas.md" in status and cleared is None
    assert sorted(table["name"]) == ["bananas.md", "eiffel.txt"]
    assert list(table.columns[:4]) == ["id", "name", "tokens", "chunks"] and (table["tokens"] > 0).all()
    eiffel = next(value for label, value in picker["choices"] if label.startswith("eiffel.txt"))
    status, table, _, _ = library.delete(tiny_bench, eiffel, "demo")
    assert "eiffel.txt" in status and list(table["name"]) == ["bananas.md"]


def test_upload_bad_input(tiny_bench, docs_dir, tmp_path):
    with pytest.raises(gr.Error, match="choose one or more files"):
        library.upload(tiny_bench, [], "demo")
    bad = tmp_path / "evil<b>.exe"
    bad.write_bytes(b"MZ\x00\x00")
    with pytest.raises(gr.Error, match="unsupported file type") as caught:
        library.upload(tiny_bench, [str(bad)], "demo")
    assert "<b>" not in str(caught.value)  # modal messages render as HTML in the browser
    with pytest.warns(UserWarning, match="unsupported"):  # one bad file among good ones is a warning
        status, *_ = library.upload(tiny_bench, [str(bad), str(docs_dir / "eiffel.txt")], "demo")
    assert "added" in status
    with pytest.raises(gr.Error, match="collection"):
        library.upload(tiny_bench, _paths(docs_dir), "bad/name")
    with pytest.raises(gr.Error, match="pick a document"):
        library.delete(tiny_bench, None, "demo")


def test_prepare_and_finetune_handlers(tiny_bench, docs_dir):
    knobs = _knobs()
    blank = [None] * len(knobs.knobs)
    with pytest.raises(gr.Error, match="pick at least one method"):
        library.prepare(tiny_bench, knobs, [], "demo", *blank)
    with pytest.raises(gr.Error, match="empty|no collection"):
        library.prepare(tiny_bench, knobs, ["rag"], "nothing-here", *blank)
    library.upload(tiny_bench, _paths(docs_dir), "demo")
    status, table, *_ = library.prepare(tiny_bench, knobs, ["rag"], "demo", *blank)
    assert "rag: nothing to prepare" in status and len(table) == 2
    with pytest.raises(gr.Error, match="no fine-tuning step"):
        library.finetune(tiny_bench, knobs, "rag", "demo", *blank)


def test_prepare_shows_progress_and_storage_per_method(tiny_bench, docs_dir, monkeypatch):
    """A stand-in method with an offline step (defined here, registered only for this test) shows that Prepare
    passes the Ask tab's knobs, reports progress, and that its storage lands in the documents table."""
    from dataclasses import dataclass

    from ragdemo import methods
    from ragdemo.methods.base import Method, Params

    @dataclass
    class WidthParams(Params):
        width: int = 3

    class FakeCache(Method):
        name, label, has_prepare, Params = "fake_cache", "Fake cache", True, WidthParams

        def prepare(self, corpus, params, progress=None):
            chunks = corpus.chunks()
            for i, chunk in enumerate(chunks):
                corpus.store.put_artifact(self.name, corpus.lm.model_id, str(params.width), str(chunk["chunk_id"]),
                                          b"x" * params.width, chunk_id=chunk["chunk_id"], collection_id=corpus.collection_id)
                progress((i + 1) / len(chunks), f"chunk {i + 1}")

        def storage(self, corpus, params):
            return corpus.store.artifact_bytes(corpus.collection_id).get(self.name, 0)

    registry()  # discover the real methods first; then add the stand-in for this test only
    monkeypatch.setitem(methods._REGISTRY, "fake_cache", FakeCache)
    library.upload(tiny_bench, [str(docs_dir / "eiffel.txt")], "demo")
    knobs = _knobs()
    values = [None] * len(knobs.knobs)
    values[next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == ("fake_cache", "width"))] = 10.0
    seen = []
    status, table, *_ = library.prepare(tiny_bench, knobs, ["fake_cache"], "demo", *values,
                                        progress=lambda fraction, desc=None: seen.append((fraction, desc)))
    n_chunks = int(table["chunks"][0])
    assert "fake_cache: prepared" in status and f"{10 * n_chunks} bytes" in status
    assert table["fake_cache storage"][0] == fmt_bytes(10 * n_chunks)
    assert seen and seen[-1][0] == 1.0 and "fake_cache" in seen[-1][1]


def _knobs():
    with gr.Blocks():
        knobs = KnobSet()
        knobs.build()
    return knobs


def _run_compare(bench, question, methods, collection, knobs=None):
    knobs = knobs or _knobs()
    steps = list(ask.compare(bench, knobs, question, methods, collection, *[None] * len(knobs.knobs)))
    return steps


def test_compare_streams_cards_then_fills_every_output(tiny_bench, docs_dir):
    library.upload(tiny_bench, _paths(docs_dir), "demo")
    steps = _run_compare(tiny_bench, "When was the Eiffel Tower completed?", ["closed_book", "full_context", "rag"], "demo")
    assert len(steps) >= 2
    assert "data-status='waiting'" in steps[0][0]
    cards, figure, sees, sources, history = steps[-1]
    assert cards.count("data-status='done'") == 3 and "rd-error" not in cards
    assert len(figure.axes) == 3
    assert sees.count("class='rd-sees'") == 3 and "data-mark='text'" in sees
    assert "eiffel.txt" in sources and "whole document" in sources  # rag and full context read the documents
    assert sorted(history["method"]) == ["closed_book", "full_context", "rag"]
    assert len(ask.history(tiny_bench, "demo")) == 3


def test_compare_uses_the_knobs_set_in_the_accordions(tiny_bench, docs_dir):
    library.upload(tiny_bench, _paths(docs_dir), "demo")
    knobs = _knobs()
    values = [None] * len(knobs.knobs)
    values[next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == ("rag", "k"))] = 1.0
    steps = list(ask.compare(tiny_bench, knobs, "Who built the tower?", ["rag"], "demo", *values))
    assert "data-status='done'" in steps[-1][0]
    run = tiny_bench.runs("demo", 1)[0]["result"]
    assert len(run["sources"]) == 1


def test_compare_bad_input(tiny_bench, docs_dir):
    with pytest.raises(gr.Error, match="empty"):
        _run_compare(tiny_bench, "   ", ["rag"], "demo")
    with pytest.raises(gr.Error, match="limit"):
        _run_compare(tiny_bench, "why? " * 1000, ["rag"], "demo")
    with pytest.raises(gr.Error, match="at least one method"):
        _run_compare(tiny_bench, "why?", [], "demo")


def test_compare_on_empty_collection_warns_and_keeps_other_methods(tiny_bench):
    with pytest.warns(UserWarning, match="needs documents"):
        steps = _run_compare(tiny_bench, "Why is the sky blue?", ["closed_book", "rag"], "empty")
    cards = steps[-1][0]
    assert cards.count("data-status='done'") == 2
    assert "rd-error" in cards and "needs documents" in cards  # rag's card explains
    assert cards.count("class='rd-answer'") + cards.count("class='rd-error'") == 2


def test_settings_failed_switch_keeps_the_previous_model(tiny_bench):
    before = tiny_bench.models.lm
    with pytest.raises(gr.Error, match="could not load model"):
        settings.apply(tiny_bench, "/no/such/model-dir", "cpu", "none", 16)
    with pytest.raises(gr.Error, match="CUDA"):
        settings.apply(tiny_bench, tiny_bench.settings.model_id, "cpu", "4bit", 16)
    assert tiny_bench.models.lm is before
    status = settings.apply(tiny_bench, tiny_bench.settings.model_id, "cpu", "none", 12)
    assert tiny_bench.settings.max_new_tokens == 12 and "max new tokens 12" in status
    with pytest.raises(gr.Error, match="between"):
        settings.apply(tiny_bench, tiny_bench.settings.model_id, "cpu", "none", 0)


def test_build_app_has_every_tab_and_method(tiny_bench):
    demo = build_app(tiny_bench)
    compare_fn = next(fn for fn in demo.fns.values() if fn.name == "run")
    upload_fn = next(fn for fn in demo.fns.values() if "upload" in [t[1] for t in fn.targets])
    # one queue slot for everything that runs the model: concurrent users wait instead of interleaving
    assert compare_fn.concurrency_limit == 1 and compare_fn.concurrency_id == upload_fn.concurrency_id
    config = demo.get_config_file()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Library", "Ask", "Methods", "Settings"} <= labels
    picker = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "method-picker")
    assert {v for _, v in picker["props"]["choices"]} == set(registry())
