"""Assembles the Gradio app: one shared Workbench behind every tab."""
from __future__ import annotations

import gradio as gr

from ..workbench import Workbench
from .ask import build_ask_tab, collection_summary, history, model_header
from .bench_tab import build_bench_tab
from .common import Jobs
from .gpu import on_zerogpu
from .library import build_library_tab, collection_names, refresh_quietly
from .methods_tab import build_methods_tab
from .settings import build_settings_tab, model_status

INTRO = """# ragdemo
Compare retrieval-augmented methods side by side on your documents: answer, tokens, time and storage.
New here? Press **Load demo collection** on the Ask tab, pick an example question and press **Compare**."""

CSS = """
#load-demo {align-self: center}
#demo-status, #library-status, #prepare-status, #bench-status, #ask-status {min-height: 1.5em}
/* History's ten columns at 800 px: smaller headers that break between words only ("storage read", not "storag e") */
#history th {font-size: var(--text-xs)}
#history th * {word-break: keep-all; overflow-wrap: normal}
/* Gradio's bundled SourceSansPro-SemiBold.woff2 is a 55-glyph subset: semibold and bold text fell back to another
   font for some letters ("RAG", the B of "BTR"). The complete Bold face, shipped next to it, stands in. */
@font-face {font-family: 'Source Sans Pro'; font-weight: 600; font-style: normal;
            src: url('static/fonts/SourceSansPro/SourceSansPro-Bold.woff2') format('woff2');}
"""


def build_app(workbench: Workbench | None = None) -> gr.Blocks:
    wb = workbench or Workbench()
    if on_zerogpu():  # ZeroGPU: models load at import, placed on "cuda" (emulated here, real in each GPU worker)
        wb.models.lm, wb.models.embedder
    else:
        wb.start()  # load (on the first start: convert) the model now, in the background; the Ask header says how far
    if not wb.store.collections():  # a fresh store: one collection to upload into (every other one is created explicitly)
        wb.create_collection(wb.settings.default_collection)
    jobs = Jobs(wb.store.home / "jobs")  # files: a Cancel reaches a job running in a ZeroGPU worker
    with gr.Blocks(title="ragdemo") as demo:
        gr.Markdown(INTRO)
        collection = gr.Dropdown(collection_names(wb), value=wb.settings.default_collection, allow_custom_value=True,
                                 label="Collection", info="the documents every tab works on; create, rename or delete "
                                 "collections in the Library tab", elem_id="collection")
        with gr.Tabs():
            # ---- tabs, in display order: adding a tab is one line here ----
            ask = build_ask_tab(wb, collection)
            library = build_library_tab(wb, collection, jobs)
            build_methods_tab()
            build_bench_tab(wb, jobs)
            settings_status = build_settings_tab(wb, ask.header)
            # ---- end of tabs ----
        library.connect_knobs(ask.knobs)
        ask.compared.then(lambda c: refresh_quietly(wb, c), [collection], library.refresh_outputs,
                          show_progress="hidden")  # storage built on first use
        ask.demo_loaded.then(lambda c: refresh_quietly(wb, c), [collection], library.refresh_outputs,
                             show_progress="hidden")
        demo.load(lambda c: refresh_quietly(wb, c), [collection], library.refresh_outputs)
        demo.load(lambda c: history(wb, c), [collection], [ask.history])
        demo.load(lambda: model_header(wb), None, [ask.header])
        # the line under the demo button follows the collection's documents (uploads, deletions, a switch)
        library.table.change(lambda c: collection_summary(wb, c), [collection], [ask.demo_status],
                             show_progress="hidden")
        collection.change(lambda c: history(wb, c), [collection], [ask.history], show_progress="hidden")
        demo.load(lambda: model_status(wb), None, [settings_status])
    demo.queue(default_concurrency_limit=4)
    return demo
