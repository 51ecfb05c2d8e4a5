"""Assembles the Gradio app: one shared Workbench behind every tab."""
from __future__ import annotations

import gradio as gr

from ..workbench import Workbench
from .ask import build_ask_tab, history
from .library import build_library_tab, collection_names, refresh
from .methods_tab import build_methods_tab
from .bench_tab import build_bench_tab
from .settings import build_settings_tab, model_status

INTRO = """# ragdemo
Upload documents, ask a question and compare retrieval-augmented methods side by side: answer, tokens, time and
storage. Open **What the model sees** under the answers to see how each method feeds the documents to the model."""


def build_app(workbench: Workbench | None = None) -> gr.Blocks:
    wb = workbench or Workbench()
    with gr.Blocks(title="ragdemo") as demo:
        gr.Markdown(INTRO)
        collection = gr.Dropdown(collection_names(wb), value=wb.settings.default_collection, allow_custom_value=True,
                                 label="Collection", info="pick one, or type a new name to create it",
                                 elem_id="collection")
        with gr.Tabs():
            # ---- tabs, in display order: adding a tab is one line here ----
            library = build_library_tab(wb, collection)
            ask = build_ask_tab(wb, collection)
            build_methods_tab()
            build_bench_tab(wb)
            settings_status = build_settings_tab(wb)
            # ---- end of tabs ----
        library.connect_knobs(ask.knobs)
        ask.compared.then(lambda c: refresh(wb, c), [collection], library.refresh_outputs)  # storage built on first use
        demo.load(lambda c: refresh(wb, c), [collection], library.refresh_outputs)
        demo.load(lambda c: history(wb, c), [collection], [ask.history])
        collection.change(lambda c: history(wb, c), [collection], [ask.history])
        demo.load(lambda: model_status(wb), None, [settings_status])
    demo.queue(default_concurrency_limit=4)
    return demo
