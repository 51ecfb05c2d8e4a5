"""Methods tab: each registered method's card (paper, mechanism, exact vs approximated) and its knobs."""
from __future__ import annotations

import gradio as gr

from ..methods import registry
from .knobs import SHARED, knob_defaults


def knob_table(params_cls: type) -> str:
    rows = [f"| `{name}` | `{default!r}` | {type(default).__name__} |"
            + (" shared: set in Settings |" if name in SHARED else " |")
            for name, default in knob_defaults(params_cls)]
    return "| knob | default | type | note |\n|---|---|---|---|\n" + "\n".join(rows)


def method_markdown(name: str, cls: type) -> str:
    steps = [label for flag, label in ((cls.has_prepare, "an offline **Prepare** step (Library tab)"),
                                       (cls.has_finetune, "a per-collection **Fine-tune** step (Library tab)")) if flag]
    extra = f"\n\nHas {' and '.join(steps)}." if steps else ""
    return f"{cls.card or '### ' + (cls.label or name)}{extra}\n\n**Knobs** (`--set {name}.KNOB=VALUE` on the command line)\n\n{knob_table(cls.Params)}"


def build_methods_tab() -> None:
    with gr.Tab("Methods", id="methods"):
        gr.Markdown("Every method answers through the same interface and returns the same record, so the numbers "
                    "on the Ask tab are comparable. Methods are found automatically: adding one is one file.")
        for name, cls in registry().items():
            with gr.Accordion(f"{cls.label or name} ({name})", open=True):
                gr.Markdown(method_markdown(name, cls))
