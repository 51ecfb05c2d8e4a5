"""Ask tab: one question, the chosen methods side by side, streamed, then charts, sources, prompt views, history."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ..errors import UserError
from ..methods import get_method, registry
from ..methods.base import Result, params_from
from ..deadline import Deadline
from ..workbench import (DEFAULT_METHODS, DEMO_ARTICLE, DEMO_COLLECTION, REPEATS, CompareListener, Workbench,
                         check_repeats)
from ..units import fmt_duration, plural
from .common import MODEL_QUEUE, method_choices, method_labels, progress_bridge, user_errors, warn
from .knobs import KnobSet
from .gpu import COMPARE_CAP_S, JOB_CAP_S, GpuGrant, answer_seconds, at_cap, on_gpu
from .library import LONG_QUEUE, collection_name, existing_collection
from .render import (HISTORY_HEADERS, HISTORY_WIDTHS, MUTED, Card, comparison_figure, esc, history_rows, render_cards,
                     render_model_sees, render_sources, source_chunk_ids)

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often streamed text is pushed to the browser
RUN_LAST = ("full_context",)  # slow methods answer after the fast ones, so the class reads those first
GOLD_SEPARATOR = " | "


def history_frame(workbench: Workbench, collection: str, limit: int = 50) -> pd.DataFrame:
    return pd.DataFrame(history_rows(workbench.runs(collection, limit)), columns=HISTORY_HEADERS)


@user_errors
def history(workbench: Workbench, collection: str) -> pd.DataFrame:
    return history_frame(workbench, collection_name(workbench, collection))


def model_header(workbench: Workbench) -> str:
    """The model's name and size: a class must know it is judging methods on a small model. While the app's
    start-up load runs (the first start converts the embedded model), it says so, with how far it is."""
    if not workbench.startup.ready:
        return f"**Model:** getting ready: {esc(startup_text(workbench))}. Buttons that need the model wait for it."
    try:
        lm = workbench.models.lm
    except Exception as exc:  # the header is informative only; Compare reports load errors properly
        return f"**Model:** not loaded ({esc(exc)})"
    n = sum(p.numel() for p in lm.model.parameters())
    size = f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"
    small = (" A model this small is wrong on many questions: compare the methods with each other, not with a "
             "large chat model.") if n < 2e9 else ""
    return (f"**Model:** {esc(lm.model_id)} · **{size} parameters** · {esc(lm.device)} · answers up to "
            f"{workbench.settings.max_new_tokens} tokens.{small}")


def startup_text(workbench: Workbench) -> str:
    startup = workbench.startup
    return f"{startup.message} ({startup.fraction:.0%})"


def header_tick(workbench: Workbench):
    """The header and its timer: it polls while the model gets ready, then stops."""
    return model_header(workbench), gr.Timer(active=not workbench.startup.ready)


# ------------------------------------------------------------------ estimates
def prefill_rate(workbench: Workbench, collection: str, results: list[Result] = ()) -> float | None:
    """Tokens per second of query-time prefill measured on this machine: from this comparison's finished
    answers and the collection's history (only answers with a long enough prompt to be representative)."""
    runs = [r for r in results if not r.error] + [Result.from_dict(run["result"]) for run in workbench.runs(collection, 50)]
    pairs = [(r.processed_tokens, r.ttft_s - r.retrieve_s - r.load_s) for r in runs
             if r.processed_tokens >= 100 and r.ttft_s - r.retrieve_s - r.load_s > 0]
    if not pairs:
        return None
    return sum(t for t, _ in pairs) / sum(s for _, s in pairs)


def full_context_estimate(workbench: Workbench, collection: str, results: list[Result] = ()) -> str:
    """Full context's expected time from its prompt length, before it runs."""
    try:
        corpus = workbench.corpus(collection, create=False)
    except UserError:
        return ""
    tokens = min(corpus.n_tokens(), corpus.lm.window - workbench.settings.max_new_tokens)
    rate = prefill_rate(workbench, collection, results)
    if rate is None:
        return f"reads about {tokens:,} tokens; expect the longest wait (no timing measured here yet)"
    # attention grows faster than linearly with length: this is a lower bound
    return f"reads about {tokens:,} tokens: at least {fmt_duration(tokens / rate)} here ({rate:,.0f} tokens/s measured)"


# ---------------------------------------------------------------- comparison
class CardListener(CompareListener):
    """Puts one Compare's progress on its cards. A method that fails on bad input shows its error on its own card
    (and as a warning); the other methods still answer."""

    def __init__(self, workbench: Workbench, cards: list[Card], collection: str, warnings: list[str]):
        self.workbench, self.cards, self.collection, self.warnings = workbench, cards, collection, warnings
        self.by_method = {card.method: card for card in cards}

    def started(self, method: str) -> None:
        card = self.by_method[method]
        if method in RUN_LAST:
            done = [c.result for c in self.cards if c.result]
            card.estimate = "expected: " + full_context_estimate(self.workbench, self.collection, done)
        card.status, card.started = "running", time.perf_counter()

    def text(self, method: str, delta: str) -> None:
        self.by_method[method].push(delta)

    def finished(self, result: Result) -> None:
        card = self.by_method[result.method]
        card.result, card.status = result, "done"

    def failed(self, method: str, exc: Exception) -> Result:
        label = self.by_method[method].label
        if isinstance(exc, UserError):
            self.warnings.append(f"{label}: {exc}")
            return Result(method, error=str(exc))
        log.exception("method %s failed", method, exc_info=exc)  # a method bug must not take the app down
        self.warnings.append(f"{label} failed: {type(exc).__name__}: {exc}")
        return Result(method, error=f"internal error: {type(exc).__name__}: {exc}")


def run_cards(workbench: Workbench, cards: list[Card], question: str, collection: str, knobs: dict,
              warnings: list[str], deadline: Deadline | None = None, repeats: int = 1) -> None:
    """One Compare over every card's method (one Workbench call, one deadline); each card fills as its method
    streams. What stops the whole Compare (a model that cannot load) goes on every card not answered yet."""
    try:
        workbench.compare(question, [c.method for c in cards], collection, knobs,
                          CardListener(workbench, cards, collection, warnings), deadline, repeats=repeats)
    except Exception as exc:  # noqa: BLE001 - reported on the cards; the log keeps a bug's traceback
        if not isinstance(exc, UserError):
            log.exception("compare failed")
        warnings.append(str(exc))
        for card in cards:
            if card.result is None:
                card.result, card.status = Result(card.method, error=str(exc)), "done"


def parse_golds(gold: str | None) -> list[str]:
    return [g.strip() for g in (gold or "").split(GOLD_SEPARATOR.strip()) if g.strip()]


def not_run(message: str):
    """What a refused Compare shows: the previous answers are cleared, so none sits under the wrong question."""
    cards = f"<div class='rd-notrun' style='{MUTED}'>Not run: {esc(message)}</div>"
    return cards, None, render_model_sees([]), render_sources([], {}, ""), gr.skip()


def compare(workbench: Workbench, knobs: KnobSet, question: str, methods: list[str] | None, collection: str,
            gold: str | None, *knob_values, deadline: Deadline | None = None, repeats: int = 1):
    """Generator for the Compare button: yields (cards, chart, model-sees, sources, history, status, *knob widgets)
    while methods run. Bad input (a question, a knob) is refused before any method runs: a sentence next to the
    button, the old answers cleared, a refused knob back at the value in force; never an error pill. `deadline`:
    the Compare's own, besides RAGDEMO_MAX_COMPARE_S (on ZeroGPU: inside its GPU grant)."""
    try:
        question = workbench.check_question(question)
        if not methods:
            raise UserError("pick at least one method")
        name = existing_collection(workbench, collection)
        values = knobs.values(*knob_values)
        repeats = check_repeats(repeats)
        workbench.refuse_training_when_shared(methods, values, "answer")
        while not workbench.startup.wait(POLL_S * 4):  # the first start converts the model: say so, not a bare clock
            yield (*[gr.skip()] * 5, f"**Waiting for the model:** {esc(startup_text(workbench))}", *knobs.unchanged())
        workbench.models.lm  # a model that cannot load is reported once, before any card
        workbench.method_params(methods, values)  # the rules that need the model, e.g. btr's split
    except UserError as exc:
        warn(str(exc))
        yield (*not_run(str(exc)), f"**Not run:** {esc(exc)}", *knobs.restored(exc))
        return
    unchanged = (gr.skip(), *knobs.unchanged())  # the status line and the knob widgets, while methods run
    labels = method_labels()
    order = list(registry())
    methods = sorted(methods, key=lambda m: (m in RUN_LAST, order.index(m) if m in order else len(order)))
    golds = parse_golds(gold)
    cards = [Card(m, labels.get(m, m), limit=_answer_limit(workbench, m, values), golds=golds) for m in methods]
    for card in cards:
        if card.method in RUN_LAST:
            card.estimate = "expected: " + full_context_estimate(workbench, name)
    warnings: list[str] = []
    worker = threading.Thread(target=run_cards, args=(workbench, cards, question, name, values, warnings, deadline,
                                                      repeats), daemon=True)
    worker.start()
    shown = 0
    yield (render_cards(cards), None, render_model_sees([]), render_sources([], {}, question), gr.skip(), "",
           *knobs.unchanged())
    while worker.is_alive():
        worker.join(POLL_S)
        shown = _flush_warnings(warnings, shown)
        yield render_cards(cards), gr.skip(), gr.skip(), gr.skip(), gr.skip(), *unchanged
    _flush_warnings(warnings, shown)
    yield (*final_outputs(workbench, cards, question, name, values), *unchanged)


def _answer_limit(workbench: Workbench, method: str, knobs: dict) -> int:
    return int(knobs.get(method, {}).get("max_new_tokens") or workbench.settings.max_new_tokens)


def _flush_warnings(warnings: list[str], shown: int) -> int:
    for message in warnings[shown:]:
        warn(message)
    return len(warnings)


def storage_split(workbench: Workbench, results: list[Result], collection: str, knobs: dict) -> dict[str, tuple[int, int]]:
    """{method: (per-chunk bytes, shared bytes)} from each method's own storage account."""
    corpus = workbench.corpus(collection, create=False)
    out = {}
    for r in results:
        try:
            method = get_method(r.method)
            account = method.storage(corpus, params_from(method.Params, knobs.get(r.method)))
            out[r.method] = (account.chunk_bytes, account.shared_bytes)
        except Exception:  # the chart falls back to the bytes the answer read; the card still has every number
            log.exception("storage account of %s", r.method)
    return out


def final_outputs(workbench: Workbench, cards: list[Card], question: str, collection: str, knobs: dict | None = None):
    results = [c.result for c in cards if c.result]
    labels = {c.method: c.label for c in cards}
    ids = sorted({i for r in results for s in r.sources for i in source_chunk_ids(s)})
    texts = {i: row["text"] for i, row in workbench.store.chunks_by_id(ids).items()}
    tokenizer = workbench.models.lm.tokenizer
    figure = comparison_figure(results, labels, storage_split(workbench, results, collection, knobs or {}))
    return (render_cards(cards), figure, render_model_sees(results, labels, tokenizer),
            render_sources(results, texts, question, labels, cards[0].golds if cards else ()),
            history_frame(workbench, collection))


# ----------------------------------------------------------------------- demo
def load_demo(workbench: Workbench, progress=None):
    """Store the demo article (a content change, in this process), switch to the demo collection and put the
    first example in the box; `prepare_demo` follows."""
    try:
        workbench.load_demo(progress_bridge(progress), prepare=False)
    except UserError as exc:
        warn(str(exc))
        return f"Demo not loaded: {esc(exc)}", gr.skip(), gr.skip(), gr.skip()
    question, answers = workbench.demo_examples(1)[0]
    status = f"Collection **{DEMO_COLLECTION}** stored: preparing every method for it…"
    return status, gr.update(value=DEMO_COLLECTION), question, GOLD_SEPARATOR.join(answers)


def prepare_demo(workbench: Workbench, progress=None, deadline: Deadline | None = None) -> str:
    """Build what is missing of the demo's artifacts (runs the model: on ZeroGPU a GPU call of its own)."""
    try:
        reports = workbench.prepare_defaults(DEMO_COLLECTION, progress_bridge(progress), deadline)
    except UserError as exc:
        warn(str(exc))
        return f"Demo not prepared: {esc(exc)}"
    prepared = [r.name for r in reports if r.status == "prepared"]
    stopped = [r.message for r in reports if r.status == "skipped" and "run it again" in r.message]
    if stopped:
        return f"Collection **{DEMO_COLLECTION}**: {esc(stopped[0])} (press **Load demo collection** again)."
    done = f" Prepared for {', '.join(prepared)}." if prepared else ""
    return collection_summary(workbench, DEMO_COLLECTION) + done


def collection_summary(workbench: Workbench, collection: str | None) -> str:
    """What the chosen collection holds, said under the demo button: it follows uploads and deletions (the demo
    collection is not "one Wikipedia article" once a class has added its own documents)."""
    try:
        name = existing_collection(workbench, collection)
    except UserError:
        return ""
    docs = [d["name"] for d in workbench.documents(name)]
    if not docs:
        return (f"Collection **{esc(name)}** is empty: add documents in the Library tab, or press **Load demo "
                "collection** for a sample article with example questions.")
    shown = ", ".join(esc(d) for d in docs[:4]) + (f" and {len(docs) - 4} more" if len(docs) > 4 else "")
    held = f"{plural(len(docs), 'document')}: {shown}"
    if docs == [DEMO_ARTICLE]:
        held = f"one Wikipedia article from SQuAD ({esc(DEMO_ARTICLE)})"
    examples = (" Pick an example question below (each has its gold answer, so cards show ✓/✗) and press "
                "**Compare**." if DEMO_ARTICLE in docs else "")
    return f"Collection **{esc(name)}** holds {held}.{examples}"


@dataclass
class AskTab:
    knobs: KnobSet
    question: gr.Textbox
    methods: gr.CheckboxGroup
    history: gr.Dataframe
    header: gr.Markdown
    compared: object  # the Compare event, so other tabs can refresh after it (e.g. storage in the Library)
    demo_loaded: object  # the Load-demo event, so the Library refreshes after it
    demo_status: gr.Markdown  # what the chosen collection holds: refreshed when its documents change


def build_ask_tab(workbench: Workbench, collection: gr.Dropdown) -> AskTab:
    wb = workbench
    knobs = KnobSet()
    with gr.Tab("Ask", id="ask"):
        header = gr.Markdown(elem_id="ask-header")
        header_timer = gr.Timer(1.0)
        with gr.Row(equal_height=True):
            demo_button = gr.Button("Load demo collection", elem_id="load-demo", scale=0, min_width=220)
            demo_status = gr.Markdown("New here? One click loads a sample article with example questions and "
                                      "prepares every method for it (a few minutes the first time, with progress here).",
                                      elem_id="demo-status")
        with gr.Row():
            question = gr.Textbox(label="Question", placeholder="Ask something your documents answer…", lines=2,
                                  scale=4, elem_id="question", max_length=wb.settings.max_question_chars * 2)
            gold = gr.Textbox(label="Gold answer (optional)", placeholder="e.g. Brazil | Brazilian", scale=2,
                              elem_id="gold", info="cards show ✓ when their answer contains it; | separates alternatives")
            compare_button = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-button")
        ask_status = gr.Markdown(elem_id="ask-status")  # why a Compare was refused, next to the button
        examples = gr.Examples([[q, GOLD_SEPARATOR.join(a)] for q, a in wb.demo_examples()], [question, gold],
                               label="Example questions on the demo collection (click one)", elem_id="examples",
                               examples_per_page=8)
        choices = method_choices()
        with gr.Row():
            methods = gr.CheckboxGroup(choices, value=[m for m in DEFAULT_METHODS if m in registry()], label="Methods",
                                       elem_id="method-picker", scale=4,
                                       info="Ticked: the methods that answer in seconds. Full context reads every "
                                            "document and takes far longer; its card shows the expected time first.")
            repeats = gr.Radio(list(REPEATS), value=1, label="Repeats", elem_id="repeats", scale=1,
                               info="answers per method: times shown as the median and range of the runs")
        with gr.Accordion("Knobs per method", open=False, elem_id="knobs"):
            knobs.build()
        gr.Markdown("### Answers")
        cards = gr.HTML(render_cards([]), elem_id="cards")
        gr.Markdown("### Cost at a glance")
        chart = gr.Plot(label="TTFT, tokens and storage per method", show_label=False, elem_id="chart")
        gr.Markdown("### What the model sees\nEach method's prompt, token by token. The colour says how each part "
                    "reached the model: read as text, loaded from a cache, compressed, binarized, merged, repeated "
                    "or retrieved while generating. Struck-through tokens were dropped by compression.")
        sees = gr.HTML(render_model_sees([]), elem_id="model-sees")
        gr.Markdown("### Sources\nThe passages each method read, most similar to the question first. **Similarity** is "
                    "the cosine of the question's and the passage's embeddings (all-MiniLM-L6-v2): 1 = the same "
                    "direction, 0 = unrelated; retrieval keeps the highest. The highlighted sentence is the one most "
                    "likely to hold the answer (answer and gold-answer words count more than question words).")
        sources = gr.HTML(render_sources([], {}, ""), elem_id="sources")
        with gr.Row():
            gr.Markdown("### History")
            refresh_button = gr.Button("Refresh history", size="sm", scale=0)
        # widths that add up to the page (no sideways scrolling at 800 px); long cells wrap
        history_table = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, elem_id="history",
                                     label="Past runs in this collection (newest first)",
                                     column_widths=HISTORY_WIDTHS, max_height=520)
    inputs = [question, methods, collection, gold, repeats, *knobs.components]
    outputs = [cards, chart, sees, sources, history_table, ask_status, *knobs.components]

    # a Compare's GPU time: its methods' usual answer times, once per repeat
    compare_grant = GpuGrant(lambda q, m, c=None, g=None, n=1, *rest: answer_seconds(wb, m) * int(n or 1), COMPARE_CAP_S)

    @on_gpu(wb.content, compare_grant)
    def run(q, m, c, g, n, *v):
        yield from compare(wb, knobs, q, m, c, g, *v, deadline=compare_grant.deadline(q, m, c, g, n), repeats=n)

    demo_grant = GpuGrant(at_cap, JOB_CAP_S)

    @on_gpu(wb.content, demo_grant)
    def run_prepare_demo(progress=gr.Progress()):
        return prepare_demo(wb, progress, demo_grant.deadline())

    compared = gr.on([compare_button.click, question.submit], run, inputs, outputs, api_name="compare", **MODEL_QUEUE)
    refresh_button.click(lambda c: history(wb, c), [collection], [history_table])
    header_timer.tick(lambda: header_tick(wb), None, [header, header_timer], show_progress="hidden", queue=False)
    demo_loaded = demo_button.click(lambda progress=gr.Progress(): load_demo(wb, progress), None,
                                    [demo_status, collection, question, gold], show_progress_on=[demo_status],
                                    api_name="load_demo", **LONG_QUEUE).then(
        run_prepare_demo, None, [demo_status], show_progress_on=[demo_status], api_name="prepare_demo", **LONG_QUEUE)
    # an example question is about the demo article: picking one switches to the demo collection
    examples.load_input_event.then(lambda: gr.update(value=DEMO_COLLECTION), None, [collection], show_progress="hidden")
    return AskTab(knobs, question, methods, history_table, header, compared, demo_loaded, demo_status)
