"""Fast UI tests: the HTML rendering helpers and the Gradio handlers called directly on a tiny workbench."""
from __future__ import annotations

import re

import gradio as gr
import pytest

from ragdemo.errors import UserError
from ragdemo.methods import registry
from ragdemo.methods.base import GLOSSARY, Result
from ragdemo.ui import build_app
from ragdemo.ui import ask, library, settings
from ragdemo.ui.common import Jobs
from ragdemo.units import fmt_bytes
from ragdemo.ui.knobs import KnobSet, knob_defaults
from ragdemo.ui.render import (SHARED_ROW, Card, comparison_figure, document_table, esc, gold_verdict, highlight_match,
                               method_colour, one_liner, render_cards,
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
    assert "80.5" in html and "2.05 kB" in html and "200 ms" in html


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


def test_every_mark_a_method_uses_has_its_own_words_in_the_legend():
    """"pruned — pruned" was lingua's legend entry: a mark without an entry repeats its own name."""
    from ragdemo.ui.render import MARKS, mark_meaning

    lingua = result("lingua", segments=[{"kind": "passage", "mark": "pruned", "text": "abc", "n_tokens": 3}])
    assert "pruned" in MARKS and mark_meaning("pruned") != "pruned"
    legend = " ".join(re.sub("<[^>]+>", " ", render_model_sees([lingua])).split())
    assert "pruned pruned" not in legend and "pruned compressed as text: predictable tokens dropped" in legend


def test_events_read_in_plain_words_whatever_their_keys():
    """RETRO's events used to list raw keys (chunk_ids, continuation_ids, retrieve_s 0.169)."""
    event = {"kind": "re-retrieval", "step": 16, "query": "the amazon river", "chunk_ids": [3, 4],
             "continuation_ids": [5], "changed": True, "action": "context rebuilt: kept 30 cached tokens, prefilled 200",
             "context_tokens": 412, "retrieve_s": 0.169, "prefilled_tokens": 200.0, "brand_new_key": "x"}
    text = re.sub("<[^>]+>", "", render_model_sees([result("retro", events=[event])]))
    assert "Re-retrieval while answering: context rebuilt" in text
    assert "after answer token 16" in text and "neighbour chunks 3, 4" in text and "search took 169 ms" in text
    assert "neighbours changed yes" in text and "context now 412 tokens" in text
    assert "prefilled 200 tokens" in text and "brand new key x" in text  # keys no dictionary knew still read
    for raw in ("chunk_ids", "continuation_ids", "retrieve_s", "0.169", "context_tokens", "brand_new_key"):
        assert raw not in text, raw


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


def test_sources_say_chunk_or_chunks_explain_similarity_and_come_most_similar_first():
    r = result(sources=[{"doc": "a.txt", "chunk_id": 2, "score": 0.41}, {"doc": "b.txt", "chunk_id": 9, "score": 0.77},
                        {"doc": "c.txt", "chunk_id": 5, "chunk_ids": [5, 6], "score": 0.5}])
    html = render_sources([r], {2: "Two.", 9: "Nine.", 5: "Five. ", 6: "Six."}, "q")
    text = re.sub("<[^>]+>", "", html)
    assert "chunk 2 ·" in text and "chunks 2" not in text and "chunks 5, 6" in text  # "chunks 2" for one chunk
    assert text.index("b.txt") < text.index("c.txt") < text.index("a.txt")  # most similar first
    assert "similarity 0.77" in text and "score" not in text
    assert "cosine" in html and "MiniLM" in html  # the number is explained where it is shown
    assert html.count("<details class='rd-source' open>") == 1 and html.index("open>") < html.index("b.txt")
    assert "3 sources" in text and "1 source<" in render_sources([result(sources=[{"doc": "a", "chunk_id": 2, "score": 1}])],
                                                               {2: "x"}, "q")


def test_the_highlight_prefers_the_sentence_holding_the_answer():
    """The question's words often sit in the sentence before the answer; the answer's words decide."""
    text = ("The Amazon basin covers parts of many nations in South America. "
            "The rainforest spans nine nations, most of it in Brazil. Rivers flood it each year.")
    question = "How many nations are within the Amazon Basin?"
    def marked(html):
        return html.split("<mark")[1].split("</mark>")[0]
    assert "Amazon basin covers" in marked(highlight_match(text, question))  # question words alone pick the wrong one
    assert "nine nations" in marked(highlight_match(text, question, "It spans nine nations."))
    assert "nine nations" in marked(highlight_match(text, question, "I do not know.", ["nine nations", "nine"]))


def test_gold_pill_lists_alternatives_in_words_and_the_adapter_badge_says_if_one_was_used():
    wrong = render_cards([Card("rag", "RAG", "done", result=result(answer="ten"), golds=["nine nations", "nine"])])
    assert "“nine nations” or “nine”" in wrong and " | " not in re.sub("<[^>]+>", "", wrong)
    used = result("lloco", notes=["collection LoRA applied (2.97 MB)"])
    assert "data-used='1'" in render_cards([Card("lloco", "LLoCO", "done", result=used)])
    btr = result("btr", notes=["distilled LoRA on layers [6, 30) applied (1.20 MB)"])
    assert "data-used='1'" in render_cards([Card("btr", "BTR", "done", result=btr)])
    html = render_cards([Card("lloco", "LLoCO", "done", result=result("lloco", notes=[]))])
    assert "data-used='0'" in html and "no adapter" in html
    assert "rd-adapter" not in render_cards([Card("rag", "RAG", "done", result=result())])  # rag has no adapter
    assert "adapter" in one_liner("lloco") and "when one was trained" in one_liner("lloco")


def test_chart_and_tables():
    figure = comparison_figure([result("closed_book", storage_bytes=0), result("rag", ttft_s=0.02),
                                result("full_context", ttft_s=51.0), Result("x", error="boom")],
                               storage={"rag": (3000, 0), "full_context": (0, 0), "closed_book": (0, 0)})
    ttft, tokens, stored = figure.axes
    assert ttft.get_xscale() == "log"  # 51 s next to 20 ms: a linear axis flattens the fast methods
    labels = sorted((t.get_position()[1], t.get_text()) for t in ttft.get_yticklabels())
    assert [text for _, text in labels] == ["full_context", "rag", "closed_book"]  # first method on top
    widths = [bar.get_width() for bar in ttft.patches]
    assert widths == pytest.approx([0.2, 0.02, 51.0])  # horizontal bars: the value is the width
    assert "ms" in " ".join(t.get_text() for t in ttft.texts) and "51.00 s" in " ".join(t.get_text() for t in ttft.texts)
    colours = {bar.get_facecolor() for bar in ttft.patches}
    assert len(colours) == 3  # one colour per method
    from matplotlib.colors import to_rgba
    assert ttft.patches[1].get_facecolor() == to_rgba(method_colour("rag"))
    assert comparison_figure([Result("x", error="boom")]) is None
    headers, rows = document_table([{"id": 1, "name": "a.txt", "n_tokens": 10, "n_chunks": 1, "size": 1500,
                                     "storage": {"btr": 4000}}])
    assert headers[-1] == "btr storage" and rows[0][-1] == "4.00 kB"
    headers, rows = document_table([{"id": 1, "name": "a.txt", "n_tokens": 10, "n_chunks": 1, "size": 1, "storage": {}}],
                                   ["lloco"])
    assert headers[-1] == "lloco storage" and rows[0][-1] == "0 B"  # preparable methods always get a column
    doc = {"id": 1, "name": "a.txt", "n_tokens": 10, "n_chunks": 1, "size": 1, "storage": {"btr": 4000}}
    headers, rows = document_table([doc], ["btr", "lloco"], shared={"btr": 1_300_000, "lloco": 0, "cacheblend": 0})
    assert headers[5:] == ["btr storage", "lloco storage"] and len(rows) == 2  # no column for nothing kept
    assert rows[1][1] == SHARED_ROW and rows[1][5:] == ["1.30 MB", "0 B"]  # the collection's decoder, its own row
    assert len(document_table([doc], ["btr"], shared={})[1]) == 1 and document_table([], ["btr"], {"btr": 5})[1] == []


def test_storage_panel_splits_per_chunk_and_shared_parts():
    figure = comparison_figure([result("btr"), result("rag")], storage={"btr": (1000, 5000), "rag": (0, 0)})
    stored = figure.axes[2]
    bars = [(round(b.get_x()), round(b.get_width())) for b in stored.patches]
    assert (0, 1000) in bars and (1000, 5000) in bars  # shared part stacked after the per-chunk part
    assert "kB" in " ".join(t.get_text() for t in stored.get_xticklabels()) or stored.xaxis.get_major_formatter()(5000, 0) == "5.00 kB"


def test_card_marks_gold_cut_prepared_and_explains_each_number():
    right = Card("rag", "RAG", "done", result=result(answer="It was finished in 1889.", new_tokens=24,
                                                        prepare_s=3.5), limit=24, golds=["1889"])
    wrong = Card("closed_book", "Closed book", "done", result=result("closed_book", answer="In 1900.", new_tokens=5),
                 limit=24, golds=["1889", "in 1889"])
    html = render_cards([right, wrong])
    assert html.count("class='rd-gold'") == 2
    assert "data-correct='1'" in html and "data-correct='0'" in html
    assert "cut at 24 tokens" in html and html.count("rd-cut") == 1  # only the answer that reached the limit
    assert "prepared on first use: 3.50 s" in html
    assert esc(GLOSSARY["processed_tokens"]) in html  # tooltip from the one glossary
    assert one_liner("rag") in html and "grid-template-columns" in html  # equal widths: a grid, not flex
    assert method_colour("rag") in html and method_colour("closed_book") in html
    no_gold = render_cards([Card("rag", "RAG", "done", result=result())])
    assert "rd-gold" not in no_gold and "rd-cut" not in no_gold and "rd-prepared" not in no_gold
    assert gold_verdict("The year 1889.", ["1889"]) and not gold_verdict("18890", ["1889"])


def test_every_method_has_a_one_line_description():
    for name in registry():
        line = one_liner(name)
        assert 10 < len(line) <= 160, name


def test_model_sees_dims_dropped_tokens():
    r = result("lloco", segments=[{"kind": "passage", "mark": "compressed", "text": "a b c d", "n_tokens": 4,
                                   "tokens": ["a", " b", " c", " d"], "keep": [1.0, 0.0, 0.75, 0.1]}])
    html = render_model_sees([r])
    assert html.count("class='rd-kept'") == 2 and html.count("class='rd-dropped'") == 2
    # the kept count adds each token's share of the layers x KV heads that kept it, as the method's note does
    assert "1.9 of 4 compressed tokens kept" in html and method_colour("lloco") in html


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


def test_knob_widgets_have_human_labels_help_bounds_and_choices():
    with gr.Blocks():
        knobs = KnobSet()
        knobs.build()
    by = {(k.method, k.name): k for k in knobs.knobs}
    scorer = by[("lloco", "scorer")]
    assert isinstance(scorer.component, gr.Dropdown) and scorer.choices == ["reconstruct", "keynorm"]
    assert by[("lloco", "positions")].choices == ["original", "compact"]
    assert by[("jrt", "context")].choices == ["rag", "full"]
    rag_k = by[("rag", "k")].component
    # no Gradio bounds: Gradio would refuse 0 with an Error box before the handler runs; the help names the range
    assert isinstance(rag_k, gr.Number) and rag_k.minimum is None and rag_k.maximum is None
    assert "a whole number from 1 to 500" in rag_k.info
    assert all(getattr(k.component, "minimum", None) is None and getattr(k.component, "maximum", None) is None
               for k in knobs.knobs)
    bits = by[("btr", "bits")]
    assert isinstance(bits.component, gr.Dropdown) and 1 in bits.choices
    assert by[("btr", "r_o")].component.label == "Offline merge share (r_o)"
    assert "uniform b-bit grid" in (bits.component.info or "")  # help declared on the knob in btr/method.py
    assert by[("btr", "merge_mode")].choices == ["once", "every"]
    assert isinstance(by[("btr", "query_aware")].component, gr.Checkbox)
    assert by[("retro", "stride")].component.info.startswith("re-retrieve")
    values = [None] * len(knobs.knobs)

    def refused(method, name, value, match):
        trial = list(values)
        trial[knobs.knobs.index(by[(method, name)])] = value
        with pytest.raises(UserError, match=match):
            knobs.values(*trial)

    refused("rag", "k", 0, r"rag\.k \(chunks retrieved\) must be a whole number from 1 to 500 \(got 0\)")
    refused("lloco", "scorer", "keynrom", "must be one of reconstruct, keynorm")
    refused("btr", "bits", 3, "one of 1, 2, 4, 8, 16")
    refused("rag", "k", 2.5, "whole number")
    refused("rag", "max_new_tokens", -3, "from 1 to 4096")


# ------------------------------------------------------------------ handlers
def _paths(docs_dir):
    return [str(docs_dir / "eiffel.txt"), str(docs_dir / "bananas.md")]


def _upload(bench, paths, collection="demo"):
    """Collections are created explicitly; preparation is off here (the tiny model is not what is tested)."""
    if collection not in {c["name"] for c in bench.store.collections()}:
        bench.create_collection(collection)
    return library.upload(bench, paths, collection, False)


def test_upload_lists_documents_and_delete_asks_first(tiny_bench, docs_dir):
    status, cleared = _upload(tiny_bench, _paths(docs_dir))
    assert "eiffel.txt" in status and "bananas.md" in status and cleared is None
    table, picker, _ = library.refresh(tiny_bench, "demo")
    assert sorted(table["name"]) == ["bananas.md", "eiffel.txt"]
    assert list(table.columns[:4]) == ["id", "name", "tokens", "chunks"] and (table["tokens"] > 0).all()
    eiffel = next(value for label, value in picker["choices"] if label.startswith("eiffel.txt"))
    question, confirm, keep = library.ask_delete_document(tiny_bench, eiffel, "demo")
    assert "eiffel.txt" in question and confirm["visible"] and keep["visible"]
    assert len(tiny_bench.documents("demo")) == 2  # asking deletes nothing
    assert library.cancel_delete()[0] == "Nothing deleted."
    status, confirm, _ = library.delete(tiny_bench, eiffel, "demo")
    assert "eiffel.txt" in status and not confirm["visible"]
    assert "dropped" not in status  # only per-chunk artifacts were prepared: they go with their document, unreported
    assert [d["name"] for d in tiny_bench.documents("demo")] == ["bananas.md"]


def test_upload_errors_stay_in_the_status_line(tiny_bench, docs_dir, tmp_path):
    """No handler raises into Gradio (that turns the table, picker and collection into "Error" pills)."""
    with pytest.warns(UserWarning, match="choose one or more files"):
        status, skipped = _upload(tiny_bench, [])
    assert status.startswith("**Not done:**") and skipped is not None  # the file box is left alone
    bad = tmp_path / "evil<b>.exe"
    bad.write_bytes(b"MZ\x00\x00")
    with pytest.warns(UserWarning, match="unsupported file type") as caught:
        status, cleared = _upload(tiny_bench, [str(bad)])
    assert len(caught) == 1  # reported once
    assert cleared is None and "Nothing was added" in status  # the rejected file is cleared from the box
    assert "<b>" not in status  # statuses render as HTML
    with pytest.warns(UserWarning, match="unsupported"):  # one bad file among good ones: the good one is stored
        status, cleared = _upload(tiny_bench, [str(bad), str(docs_dir / "eiffel.txt")])
    assert "added" in status and cleared is None
    table, _, _ = library.refresh(tiny_bench, "demo")
    assert list(table["name"]) == ["eiffel.txt"]
    with pytest.warns(UserWarning, match="collection"):
        status, _ = library.upload(tiny_bench, _paths(docs_dir), "bad/name", False)
    assert "Not done" in status
    with pytest.warns(UserWarning, match="pick a document"):
        assert "Not done" in library.ask_delete_document(tiny_bench, None, "demo")[0]


def test_typing_a_collection_name_never_creates_it(tiny_bench, docs_dir):
    before = {c["name"] for c in tiny_bench.store.collections()}
    with pytest.warns(UserWarning, match="no collection named .*typo"):
        status, _ = library.upload(tiny_bench, _paths(docs_dir), "typo", False)
    library.refresh(tiny_bench, "typo")
    ask.history(tiny_bench, "typo")
    assert tiny_bench.documents("typo") == [] and tiny_bench.runs("typo") == []
    assert {c["name"] for c in tiny_bench.store.collections()} == before


def test_collection_retriever_is_set_in_the_library_and_used_by_answers(tiny_bench, docs_dir):
    library.create_collection(tiny_bench, "bits")
    library.upload(tiny_bench, [str(docs_dir / "eiffel.txt")], "bits", False)
    assert library.retrieval_of(tiny_bench, "bits") == ("float", 10)
    status = library.set_retrieval(tiny_bench, "bits", "binary", 4)
    assert "binary" in status and "x 4" in status
    assert library.retrieval_of(tiny_bench, "bits") == ("binary", 4)  # stored with the collection
    (result,) = tiny_bench.ask("When was the tower completed?", ["rag"], "bits")
    assert any("retriever: binary" in note for note in result.notes)
    with pytest.warns(UserWarning, match="no collection named"):
        library.set_retrieval(tiny_bench, "nosuch", "binary", 4)
    assert "nosuch" not in {c["name"] for c in tiny_bench.store.collections()}
    with pytest.warns(UserWarning, match="retriever must be one of"):
        library.set_retrieval(tiny_bench, "bits", "sparse", 4)
    assert library.retrieval_of(tiny_bench, "bits") == ("binary", 4)  # a refused value changes nothing


def test_collections_create_rename_delete_with_confirmation(tiny_bench, docs_dir):
    status, dropdown = library.create_collection(tiny_bench, "notes")
    assert "Created" in status and dropdown["value"] == "notes" and "notes" in dropdown["choices"]
    with pytest.warns(UserWarning, match="already exists"):
        library.create_collection(tiny_bench, "notes")
    library.upload(tiny_bench, [str(docs_dir / "eiffel.txt")], "notes", False)
    status, dropdown = library.rename_collection(tiny_bench, "notes", "physics")
    assert dropdown["value"] == "physics" and "notes" not in dropdown["choices"]
    assert [d["name"] for d in tiny_bench.documents("physics")] == ["eiffel.txt"]
    question, confirm, _ = library.ask_delete_collection(tiny_bench, "physics")
    assert "1 document " in question and confirm["visible"] and tiny_bench.documents("physics")
    status, dropdown, confirm, _ = library.delete_collection(tiny_bench, "physics")
    assert "Deleted" in status and "physics" not in dropdown["choices"] and not confirm["visible"]
    assert tiny_bench.store.collections()  # the app always keeps one collection to upload into


def test_prepare_and_finetune_handlers(tiny_bench, docs_dir):
    knobs = _knobs()
    blank = [None] * len(knobs.knobs)
    with pytest.warns(UserWarning, match="pick at least one method"):
        library.prepare(tiny_bench, knobs, [], "demo", *blank)
    with pytest.warns(UserWarning, match="no collection"):
        library.prepare(tiny_bench, knobs, ["rag"], "nothing-here", *blank)
    _upload(tiny_bench, _paths(docs_dir))
    status = library.prepare(tiny_bench, knobs, ["rag"], "demo", *blank)
    assert "rag: nothing to prepare" in status
    with pytest.warns(UserWarning, match="no fine-tuning step"):
        library.finetune(tiny_bench, knobs, "rag", "demo", *blank)


def _fake_cache_method(monkeypatch, seen_steps=None):
    """A stand-in method with an offline step (registered only for the test calling this)."""
    from dataclasses import dataclass

    from ragdemo import methods
    from ragdemo.methods.base import Method, Params, StorageAccount
    from ragdemo.store.db import chunk_key

    @dataclass
    class WidthParams(Params):
        width: int = 3  # bytes stored per chunk

    class FakeCache(Method):
        name, label, has_prepare, Params = "fake_cache", "Fake cache", True, WidthParams

        def prepare(self, corpus, params, progress=None):
            chunks = corpus.chunks()
            for i, chunk in enumerate(chunks):
                if progress:
                    progress(i / len(chunks), f"chunk {i + 1}")
                corpus.store.put_artifact(self.name, corpus.lm.model_id, str(params.width), chunk_key(chunk["text"]),
                                          b"x" * params.width, chunk_id=chunk["chunk_id"], collection_id=corpus.collection_id)
                if seen_steps is not None:
                    seen_steps.append(i)
            if progress:
                progress(1.0, "done")

        def storage(self, corpus, params):
            return StorageAccount(corpus.store.artifact_bytes(corpus.collection_id).get(self.name, 0),
                                  tokens=corpus.n_tokens())

    registry()  # discover the real methods first; then add the stand-in for this test only
    monkeypatch.setitem(methods._REGISTRY, "fake_cache", FakeCache)
    return FakeCache


def test_prepare_shows_progress_and_storage_per_method(tiny_bench, docs_dir, monkeypatch):
    """Prepare passes the Ask tab's knobs, reports progress, and its storage lands in the documents table."""
    _fake_cache_method(monkeypatch)
    _upload(tiny_bench, [str(docs_dir / "eiffel.txt")])
    knobs = _knobs()
    values = [None] * len(knobs.knobs)
    values[next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == ("fake_cache", "width"))] = 10.0
    seen = []
    status = library.prepare(tiny_bench, knobs, ["fake_cache"], "demo", *values,
                             progress=lambda fraction, message: seen.append((fraction, message)))
    table, _, _ = library.refresh(tiny_bench, "demo")
    n_chunks = int(table["chunks"][0])
    assert f"fake_cache: prepared ({fmt_bytes(10 * n_chunks)} stored)" in status
    assert table["fake_cache storage"][0] == fmt_bytes(10 * n_chunks)
    assert seen and seen[-1][0] == 1.0 and "fake_cache" in seen[-1][1]


def test_cancel_stops_prepare_at_the_next_step_and_keeps_what_was_done(tiny_bench, docs_dir, monkeypatch):
    steps = []
    _fake_cache_method(monkeypatch, steps)
    _upload(tiny_bench, _paths(docs_dir))
    n_chunks = len(tiny_bench.corpus("demo").chunks())
    assert n_chunks >= 4
    jobs, knobs = Jobs(), _knobs()
    blank = [None] * len(knobs.knobs)

    class Request:
        session_hash = "user-a"

    def progress(fraction, desc=None):
        if len(steps) == 2:  # the user presses Cancel as the third chunk starts
            assert library.cancel_job(jobs, "prepare", Request()).startswith("Cancelling")

    status = library.run_job(jobs, "prepare", Request(), progress,
                             lambda p: library.prepare(tiny_bench, knobs, ["fake_cache"], "demo", *blank, progress=p))
    assert status.startswith("**Cancelled.**")
    assert len(steps) == 3 < n_chunks  # the step under way finishes; the next one never starts
    stored = tiny_bench.store.artifact_bytes(tiny_bench.corpus("demo").collection_id).get("fake_cache", 0)
    assert stored == 3 * 3  # the finished chunks are kept whole
    assert library.cancel_job(jobs, "prepare", Request()) == "Nothing to cancel."  # the flag is gone with the job
    assert tiny_bench.store.integrity_problems() == []


def _knobs():
    with gr.Blocks():
        knobs = KnobSet()
        knobs.build()
    return knobs


def _run_compare(bench, question, methods, collection, knobs=None, gold="", values=None):
    knobs = knobs or _knobs()
    values = values or [None] * len(knobs.knobs)
    return list(ask.compare(bench, knobs, question, methods, collection, gold, *values))


def test_compare_streams_cards_then_fills_every_output(tiny_bench, docs_dir):
    _upload(tiny_bench, _paths(docs_dir))
    steps = _run_compare(tiny_bench, "When was the Eiffel Tower completed?", ["full_context", "closed_book", "rag"],
                         "demo", gold="1889")
    assert len(steps) >= 2
    assert "data-status='waiting'" in steps[0][0]
    assert "rd-estimate" in steps[0][0] and "reads about" in steps[0][0]  # full context's expected cost, up front
    cards, figure, sees, sources, history = steps[-1][:5]
    assert cards.count("data-status='done'") == 3 and "rd-error" not in cards
    assert cards.count("class='rd-gold'") == 3  # every card judged against the gold answer
    order = re.findall(r"class='rd-card' data-method='(\w+)'", cards)
    assert order == ["closed_book", "rag", "full_context"]  # the slow method answers last
    assert len(figure.axes) == 3
    assert sees.count("class='rd-sees'") == 3 and "data-mark='text'" in sees
    assert "eiffel.txt" in sources and "whole document" in sources  # rag and full context read the documents
    assert sorted(history["method"]) == ["closed_book", "full_context", "rag"]
    assert len(ask.history(tiny_bench, "demo")) == 3


def test_full_context_estimate_uses_measured_prefill_rate(tiny_bench, docs_dir):
    _upload(tiny_bench, _paths(docs_dir))
    assert "no timing measured" in ask.full_context_estimate(tiny_bench, "demo")
    measured = [Result("rag", processed_tokens=400, ttft_s=2.1, retrieve_s=0.1)]  # 200 tokens/s
    tokens = tiny_bench.corpus("demo").n_tokens()
    text = ask.full_context_estimate(tiny_bench, "demo", measured)
    assert "200 tokens/s" in text and f"{tokens:,} tokens" in text


def test_compare_uses_the_knobs_set_in_the_accordions(tiny_bench, docs_dir):
    _upload(tiny_bench, _paths(docs_dir))
    knobs = _knobs()
    values = [None] * len(knobs.knobs)
    values[next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == ("rag", "k"))] = 1.0
    steps = _run_compare(tiny_bench, "Who built the tower?", ["rag"], "demo", knobs, values=values)
    assert "data-status='done'" in steps[-1][0]
    run = tiny_bench.runs("demo", 1)[0]["result"]
    assert len(run["sources"]) == 1 and run["params"]["k"] == 1  # History can tell runs with other knobs apart
    assert "k=1" in steps[-1][4]["knobs"][0]


def test_compare_bad_input_clears_old_answers_without_error_pills(tiny_bench, docs_dir):
    _upload(tiny_bench, _paths(docs_dir))
    knobs = _knobs()
    for question, methods, message in (("   ", ["rag"], "empty"), ("why? " * 1000, ["rag"], "limit"),
                                       ("why?", [], "at least one method")):
        with pytest.warns(UserWarning, match=message):
            (cards, chart, sees, sources, history, status, *_), = _run_compare(tiny_bench, question, methods, "demo",
                                                                                knobs)
        assert "Not run" in cards and message in cards and "rd-card" not in cards and chart is None
        assert "Not run" in status and message in status  # said next to the Compare button too
    values = [None] * len(knobs.knobs)
    values[next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == ("rag", "k"))] = 0
    with pytest.warns(UserWarning, match=r"rag\.k .*from 1 to 500"):  # k=0 would silently answer closed book
        (cards, *_), = _run_compare(tiny_bench, "why?", ["rag"], "demo", knobs, values=values)
    assert tiny_bench.runs("demo") == []  # nothing ran


def test_compare_on_empty_collection_warns_and_keeps_other_methods(tiny_bench):
    tiny_bench.create_collection("empty")
    with pytest.warns(UserWarning, match="needs documents"):
        steps = _run_compare(tiny_bench, "Why is the sky blue?", ["closed_book", "rag"], "empty")
    cards = steps[-1][0]
    assert cards.count("data-status='done'") == 2
    assert "rd-error" in cards and "needs documents" in cards  # rag's card explains
    assert cards.count("class='rd-answer'") + cards.count("class='rd-error'") == 2


# --------------------------------------------------------------------- demo
def test_demo_examples_are_answerable_from_the_demo_article():
    from ragdemo.bench.datasets import load_squad
    from ragdemo.workbench import DEMO_ARTICLE, Workbench

    examples = Workbench.demo_examples()
    assert len(examples) == 8
    article = dict(load_squad().haystacks[0].documents)[DEMO_ARTICLE]
    for question, answers in examples:
        assert question.endswith("?") and answers and all(a in article for a in answers)


def test_demo_examples_start_with_clear_questions_a_class_can_judge():
    """Curated, not SQuAD's order (which starts with "What is the Dutch word for the Amazon rainforest?"): every
    example has a short answer that is not already in its question, and none repeats another."""
    from ragdemo.workbench import Workbench, demo_question_ids

    examples = Workbench.demo_examples()
    assert [a[0] for _, a in examples[:2]] == ["Brazil", "16,000"]
    assert len(set(demo_question_ids())) == len(demo_question_ids()) == len(examples)
    for question, answers in examples:
        shortest = min(answers, key=len)
        assert len(shortest.split()) <= 3
        assert shortest.lower() not in question.lower()
        assert "dutch" not in question.lower() and "word for" not in question.lower()


def test_the_line_under_the_demo_button_follows_the_collections_documents(tiny_bench, docs_dir, monkeypatch):
    """It said "one Wikipedia article" after a class had added its own documents."""
    from ragdemo.workbench import DEMO_COLLECTION

    monkeypatch.setattr(tiny_bench, "_prepare_defaults", lambda corpus, progress: [])
    ask.load_demo(tiny_bench)
    alone = ask.collection_summary(tiny_bench, DEMO_COLLECTION)
    assert "one Wikipedia article" in alone and "Compare" in alone
    _upload(tiny_bench, _paths(docs_dir), DEMO_COLLECTION)
    grown = ask.collection_summary(tiny_bench, DEMO_COLLECTION)
    assert "3 documents" in grown and "Wikipedia article" not in grown and "eiffel.txt" in grown
    tiny_bench.create_collection("empty")
    assert "is empty" in ask.collection_summary(tiny_bench, "empty")
    assert ask.collection_summary(tiny_bench, "no-such") == ""


def test_upload_report_says_each_outcome_once_in_plain_words():
    from ragdemo.ingest import IngestReport

    lines = [library.report_line(r) for r in (
        IngestReport("a.txt", "added", "a.txt: 1 token in 1 chunk"),
        IngestReport("btr", "dropped", "btr: 1.58 MB it had built from all the previous documents was removed, ..."),
        IngestReport("btr", "prepared", "btr: ready for questions, 1.60 MB stored"))]
    assert lines[0] == "- **added** a.txt: 1 token in 1 chunk"
    assert lines[1].startswith("- btr: 1.58 MB") and lines[2] == "- btr: ready for questions, 1.60 MB stored"
    assert not any("prepared** btr: prepared" in line or "**dropped** btr" in line for line in lines)


def test_counts_are_singular_for_one():
    from ragdemo.units import plural

    assert plural(1, "question") == "1 question" and plural(2, "question") == "2 questions"
    assert plural(0, "chunk") == "0 chunks" and plural(1200, "token") == "1,200 tokens"


def test_load_demo_fills_the_collection_and_the_first_example(tiny_bench, monkeypatch):
    from ragdemo.workbench import DEMO_ARTICLE, DEMO_COLLECTION

    calls = []
    monkeypatch.setattr(tiny_bench, "_prepare_defaults",
                        lambda corpus, progress, deadline=None: calls.append(corpus.collection) or [])
    status, collection, question, gold = ask.load_demo(tiny_bench)  # stores the article (this process)
    assert collection["value"] == DEMO_COLLECTION and "Compare" not in status and calls == []
    assert [d["name"] for d in tiny_bench.documents(DEMO_COLLECTION)] == [DEMO_ARTICLE]
    assert (question, ask.parse_golds(gold)) == tuple(tiny_bench.demo_examples(1)[0])
    assert "Compare" in ask.prepare_demo(tiny_bench)  # then prepares it (a GPU call on ZeroGPU)
    assert calls == [DEMO_COLLECTION]  # the demo is prepared for the methods that have offline artifacts
    ask.load_demo(tiny_bench)  # idempotent: the article is recognised by content
    ask.prepare_demo(tiny_bench)
    assert len(tiny_bench.documents(DEMO_COLLECTION)) == 1 and calls == [DEMO_COLLECTION] * 2


def test_while_the_model_gets_ready_the_header_and_compare_say_so(tiny_bench, docs_dir):
    """The first start converts the embedded model (~20 s): the page says so with how far it is, and a Compare
    pressed meanwhile says it waits for the model instead of a bare clock, then answers."""
    import threading

    _upload(tiny_bench, _paths(docs_dir))
    startup = tiny_bench.startup
    startup.begin()
    startup.update(0.4, "first start: converting the embedded model: de-quantizing tensor 100 of 272")
    header = ask.model_header(tiny_bench)
    assert "getting ready" in header and "de-quantizing tensor 100 of 272 (40%)" in header
    content, timer = ask.header_tick(tiny_bench)
    assert timer.active  # the header keeps polling until the model is ready
    knobs = _knobs()
    threading.Timer(3.0, startup.finish).start()
    steps = _run_compare(tiny_bench, "Who built the tower?", ["rag"], "demo", knobs)
    assert "Waiting for the model" in steps[0][5] and "40%" in steps[0][5]
    assert "data-status='done'" in steps[-1][0]
    assert not ask.header_tick(tiny_bench)[1].active and "parameters" in ask.model_header(tiny_bench)


def test_model_header_names_the_model_and_its_size(tiny_bench):
    header = ask.model_header(tiny_bench)
    n = sum(p.numel() for p in tiny_bench.models.lm.model.parameters())
    assert tiny_bench.models.lm.model_id in header and f"{n / 1e6:.0f} M parameters" in header


# ----------------------------------------------------------------- settings
def test_settings_failed_switch_keeps_the_previous_model_and_resets_widgets(tiny_bench):
    before = tiny_bench.models.lm
    in_force = settings.current_values(tiny_bench)
    with pytest.warns(UserWarning, match="could not load model"):
        status, *widgets = settings.apply(tiny_bench, "/no/such/model-dir", "cpu", "none", 16)
    assert "Not applied" in status and tuple(widgets) == in_force  # the page shows what runs
    with pytest.warns(UserWarning, match="CUDA"):
        settings.apply(tiny_bench, tiny_bench.settings.model_id, "cpu", "4bit", 16)
    assert tiny_bench.models.lm is before
    status, *widgets = settings.apply(tiny_bench, tiny_bench.settings.model_id, "cpu", "none", 12)
    assert tiny_bench.settings.max_new_tokens == 12 and "max new tokens 12" in status and widgets[-1] == 12
    with pytest.warns(UserWarning, match=r"max new tokens must be a whole number from 1 to 4096 \(got 0\)"):
        status, *widgets = settings.apply(tiny_bench, tiny_bench.settings.model_id, "cpu", "none", 0)
    assert "Not applied" in status and widgets[-1] == 12  # the box shows the value in force again
    assert "--" not in settings.in_ui_words("no CUDA GPU is visible; use --device cpu")


def test_settings_offers_only_devices_this_machine_has():
    import torch

    assert ("cuda" in settings.DEVICES) == torch.cuda.is_available()
    assert "mps" not in settings.DEVICES or torch.backends.mps.is_available()


def test_build_app_has_every_tab_and_method(tiny_bench):
    demo = build_app(tiny_bench)
    compare_fn = next(fn for fn in demo.fns.values() if fn.name == "run" and "compare" in str(fn.api_name))
    upload_fn = next(fn for fn in demo.fns.values() if "upload" in str(fn.api_name))
    # one queue slot for answers; long jobs (upload with preparation, benchmark) in another, so a Compare
    # waits for one step of a long job (the model lock), not for all of it
    assert compare_fn.concurrency_limit == 1 and compare_fn.concurrency_id == "model"
    assert upload_fn.concurrency_id == "long"
    config = demo.get_config_file()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Library", "Ask", "Methods", "Settings"} <= labels
    picker = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "method-picker")
    assert {v for _, v in picker["props"]["choices"]} == set(registry())
    assert set(picker["props"]["value"]) == {"closed_book", "rag", "retro", "btr", "lloco"} & set(registry())
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"load-demo", "gold", "confirm-delete", "prepare-cancel", "bench-cancel", "ask-header"} <= ids


def test_methods_tab_knob_table_is_read_from_the_declarations():
    from ragdemo.methods.lloco import LlocoParams
    from ragdemo.ui.methods_tab import knob_table

    table = knob_table(LlocoParams)  # read from the knobs' declarations: what each accepts and does
    assert "| Compression ratio | `c` | `4` | a whole number from 1 to 64 | compression ratio: keep 1/c" in table
    assert "| one of reconstruct, keynorm | which tokens to keep: reconstruct (KVzip-style) or keynorm |" in table


def test_cancel_pressed_while_the_job_waits_in_the_queue_is_not_lost():
    class Request:
        session_hash = "user-b"

    jobs, ran = Jobs(), []
    jobs.start("user-b", "prepare")  # the click registers the job at once (queue=False)
    assert library.cancel_job(jobs, "prepare", Request()).startswith("Cancelling")  # pressed before it started

    def job(progress):
        progress(0.0, "first step")
        ran.append("work")
        return "done"

    status = library.run_job(jobs, "prepare", Request(), None, library.reported(1)(job))
    assert status.startswith("**Cancelled.**") and ran == []


def test_every_handler_gets_its_request_and_progress_from_gradio(tiny_bench):
    """Gradio injects gr.Request and gr.Progress only into parameters before *args: a keyword-only one is never
    filled and the handler fails with a TypeError in the real app (the benchmark's Run and Prepare did), which
    tests calling the handlers directly cannot see."""
    import inspect
    import typing

    app = build_app(tiny_bench)
    fns = app.fns.values() if isinstance(app.fns, dict) else app.fns
    checked, missed = 0, []
    for block_fn in fns:
        fn = block_fn.fn
        if fn is None:
            continue
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 - a lambda or builtin without resolvable hints
            hints = {}
        for param in inspect.signature(fn).parameters.values():
            special = hints.get(param.name) is gr.Request or isinstance(param.default, gr.Progress)
            if special:
                checked += 1
                if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                    missed.append(f"{fn.__qualname__}({param.name})")
    assert checked >= 3 and not missed, missed  # bench Run, Prepare, Fine-tune, Compare, upload at least
