"""Ask tab: one question, the chosen methods side by side, streamed, then charts, sources, prompt views, history."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ..errors import UserError
from ..methods import registry
from ..methods.base import Result
from ..workbench import DEFAULT_METHODS, Workbench
from .common import MODEL_QUEUE, error, method_choices, method_labels, user_errors, warn
from .knobs import KnobSet
from .library import collection_name
from .render import (HISTORY_HEADERS, Card, comparison_figure, history_rows, render_cards, render_model_sees,
                     render_sources, source_chunk_ids)

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often streamed text is pushed to the browser


def history_frame(workbench: Workbench, collection: str, limit: int = 50) -> pd.DataFrame:
    return pd.DataFrame(history_rows(workbench.runs(collection, limit)), columns=HISTORY_HEADERS)


@user_errors
def history(workbench: Workbench, collection: str) -> pd.DataFrame:
    return history_frame(workbench, collection_name(workbench, collection))


def run_cards(workbench: Workbench, cards: list[Card], question: str, collection: str, knobs: dict,
              warnings: list[str]) -> None:
    """Run the methods one by one (each through Workbench.ask, which records the run). A method that fails
    on bad input shows its error on its own card; the other methods still answer."""
    for card in cards:
        card.status, card.started = "running", time.perf_counter()
        try:
            card.result = workbench.ask(question, [card.method], collection, knobs,
                                        stream=lambda _method, delta, c=card: c.push(delta))[0]
        except UserError as exc:
            card.result = Result(card.method, error=str(exc))
            warnings.append(f"{card.label}: {exc}")
        except Exception as exc:  # a method bug must not take the app down; the log keeps the traceback
            log.exception("method %s failed", card.method)
            card.result = Result(card.method, error=f"internal error: {type(exc).__name__}: {exc}")
            warnings.append(f"{card.label} failed: {type(exc).__name__}: {exc}")
        card.status = "done"


def compare(workbench: Workbench, knobs: KnobSet, question: str, methods: list[str] | None, collection: str,
            *knob_values):
    """Generator for the Compare button: yields (cards, chart, model-sees, sources, history) while methods run."""
    try:
        question = workbench.check_question(question)
        if not methods:
            raise UserError("pick at least one method")
        name = collection_name(workbench, collection)
        workbench.corpus(name)  # picking a new collection name creates it; closed book works on an empty one
        workbench.models.lm  # a model that cannot load is reported once, before any card
        values = knobs.values(*knob_values)
    except UserError as exc:
        raise error(str(exc)) from None
    labels = method_labels()
    cards = [Card(m, labels.get(m, m)) for m in methods]
    warnings: list[str] = []
    worker = threading.Thread(target=run_cards, args=(workbench, cards, question, name, values, warnings), daemon=True)
    worker.start()
    shown = 0
    yield render_cards(cards), None, render_model_sees([]), render_sources([], {}, question), gr.skip()
    while worker.is_alive():
        worker.join(POLL_S)
        shown = _flush_warnings(warnings, shown)
        yield render_cards(cards), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    _flush_warnings(warnings, shown)
    yield final_outputs(workbench, cards, question, name)


def _flush_warnings(warnings: list[str], shown: int) -> int:
    for message in warnings[shown:]:
        warn(message)
    return len(warnings)


def final_outputs(workbench: Workbench, cards: list[Card], question: str, collection: str):
    results = [c.result for c in cards if c.result]
    labels = {c.method: c.label for c in cards}
    ids = sorted({i for r in results for s in r.sources for i in source_chunk_ids(s)})
    texts = {i: row["text"] for i, row in workbench.store.chunks_by_id(ids).items()}
    tokenizer = workbench.models.lm.tokenizer
    return (render_cards(cards), comparison_figure(results, labels), render_model_sees(results, labels, tokenizer),
            render_sources(results, texts, question, labels), history_frame(workbench, collection))


@dataclass
class AskTab:
    knobs: KnobSet
    question: gr.Textbox
    methods: gr.CheckboxGroup
    history: gr.Dataframe
    compared: object  # the Compare event, so other tabs can refresh after it (e.g. storage in the Library)


def build_ask_tab(workbench: Workbench, collection: gr.Dropdown) -> AskTab:
    wb = workbench
    knobs = KnobSet()
    with gr.Tab("Ask", id="ask"):
        with gr.Row():
            question = gr.Textbox(label="Question", placeholder="Ask something your documents answer…", lines=2,
                                  scale=4, elem_id="question", max_length=wb.settings.max_question_chars * 2)
            compare_button = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-button")
        choices = method_choices()
        methods = gr.CheckboxGroup(choices, value=[m for m in DEFAULT_METHODS if m in registry()], label="Methods",
                                   elem_id="method-picker", info="Every installed method appears here; see the Methods tab for what each does.")
        with gr.Accordion("Knobs per method", open=False):
            knobs.build()
        gr.Markdown("### Answers")
        cards = gr.HTML(render_cards([]), elem_id="cards")
        gr.Markdown("### Cost at a glance")
        chart = gr.Plot(label="TTFT, tokens and storage per method", show_label=False, elem_id="chart")
        gr.Markdown("### What the model sees\nEach method's prompt, token by token. The colour says how each part "
                    "reached the model: read as text, loaded from a cache, compressed, binarized, merged, repeated "
                    "or retrieved while generating.")
        sees = gr.HTML(render_model_sees([]), elem_id="model-sees")
        gr.Markdown("### Sources\nThe passages each method read; the sentence closest to the question and answer is highlighted.")
        sources = gr.HTML(render_sources([], {}, ""), elem_id="sources")
        with gr.Row():
            gr.Markdown("### History")
            refresh_button = gr.Button("Refresh history", size="sm", scale=0)
        history_table = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, elem_id="history",
                                     column_widths=["12%", "20%", "9%", "13%", "22%", "6%", "6%", "6%", "6%"],
                                     label="Past runs in this collection (newest first)")
    inputs = [question, methods, collection, *knobs.components]
    outputs = [cards, chart, sees, sources, history_table]

    def run(q, m, c, *v):
        yield from compare(wb, knobs, q, m, c, *v)

    compared = gr.on([compare_button.click, question.submit], run, inputs, outputs, api_name="compare", **MODEL_QUEUE)
    refresh_button.click(lambda c: history(wb, c), [collection], [history_table])
    return AskTab(knobs, question, methods, history_table, compared)

