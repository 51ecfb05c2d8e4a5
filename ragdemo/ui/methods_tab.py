"""Methods tab: each registered method as a three-line summary (paper, mechanism, measured headline) with its
card (paper, mechanism, exact vs approximated) and knobs folded underneath."""
from __future__ import annotations


import gradio as gr

from ..methods import registry
from ..cards import card_markdown, card_text, figures, headline, load_suite, scaling_figure, where_each_method_wins
from ..params import knob_table as declared_knob_table
from .knobs import SHARED
from .render import one_liner

SHARED_NOTE = {name: "shared by every method; in the Ask tab 0 = the Settings value" for name in SHARED}


def knob_table(params_cls: type) -> str:
    return declared_knob_table(params_cls, SHARED_NOTE)


def paper_line(card: str, fallback: str) -> str:
    heading = next((line.lstrip("#").strip() for line in card.splitlines() if line.startswith("#")), "")
    return heading or fallback


def method_summary(name: str, cls: type) -> str:
    card = card_text(name)
    return (f"**{paper_line(card, cls.label or name)}**  \n{one_liner(name)}  \n"
            f"<span style='color:#6b7280'>Measured: {headline(name)}</span>")


def method_markdown(name: str, cls: type) -> str:
    """The card with what the suite measured, the steps the method offers, and its knobs (`python -m ragdemo
    methods NAME` prints the same text)."""
    steps = [label for flag, label in ((cls.has_prepare, "an offline **Prepare** step (Library tab)"),
                                       (cls.has_finetune, "a per-collection **Fine-tune** step (Library tab)")) if flag]
    extra = f"\n\nHas {' and '.join(steps)}." if steps else ""
    return f"{card_markdown(name)}{extra}\n\n**Knobs** (`--set {name}.KNOB=VALUE` on the command line)\n\n{knob_table(cls.Params)}"


def build_methods_tab() -> None:
    with gr.Tab("Methods", id="methods"):
        gr.Markdown("Every method answers through the same interface and returns the same record, so the numbers "
                    "on the Ask tab are comparable. Methods are found automatically: adding one is one file. "
                    "Open a method for its card and knobs.")
        suite = load_suite()
        with gr.Accordion("Where each method wins: cost as the context grows (results suite)", open=False):
            figure = scaling_figure(suite)
            if figure is not None:
                gr.Image(str(figure), label=f"{suite.relative()}/{figure.relative_to(suite.folder).as_posix()}",
                         show_label=True, interactive=False, buttons=["fullscreen"])
            gr.Markdown(where_each_method_wins(suite), elem_classes=["rd-where-wins"])
        for name, cls in registry().items():
            gr.Markdown(method_summary(name, cls), elem_classes=["rd-method-summary"])
            with gr.Accordion(f"{cls.label or name}: details and knobs", open=False):
                gr.Markdown(method_markdown(name, cls))
        if suite is not None:
            with gr.Accordion("Every method on one plot (results suite)", open=False):
                for path in figures(suite):
                    gr.Image(str(path), label=f"{suite.relative()}/{path.relative_to(suite.folder).as_posix()}",
                             show_label=True, interactive=False, buttons=["fullscreen"])
