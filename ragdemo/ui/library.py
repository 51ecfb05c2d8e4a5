"""Library tab: upload documents into a collection, see what is stored, delete, and prepare method artifacts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..ingest.readers import SUPPORTED
from ..methods import registry
from ..store.db import check_collection_name
from ..workbench import Workbench
from .common import MODEL_QUEUE, error, method_choices, progress_bridge, user_errors, warn
from .knobs import KnobSet
from .render import document_table, esc


def collection_name(workbench: Workbench, collection: str | None) -> str:
    return check_collection_name((collection or "").strip() or workbench.settings.default_collection)


def collection_names(workbench: Workbench) -> list[str]:
    return [c["name"] for c in workbench.store.collections()] or [workbench.settings.default_collection]


def documents_frame(workbench: Workbench, collection: str) -> pd.DataFrame:
    preparable = [name for name, cls in registry().items() if cls.has_prepare]
    headers, rows = document_table(workbench.documents(collection), preparable)
    return pd.DataFrame(rows, columns=headers)


def document_choices(workbench: Workbench, collection: str) -> list[tuple[str, str]]:
    return [(f"{d['name']} (id {d['id']})", str(d["id"])) for d in workbench.documents(collection)]


@user_errors
def refresh(workbench: Workbench, collection: str):
    """Documents table, the delete picker and the collection list, after anything changed."""
    name = collection_name(workbench, collection)
    choices = document_choices(workbench, name)
    return (documents_frame(workbench, name), gr.update(choices=choices, value=None),
            gr.update(choices=sorted(set(collection_names(workbench)) | {name})))


@user_errors
def upload(workbench: Workbench, files: list[str] | None, collection: str, progress=gr.Progress()):
    """Ingest every uploaded file; a bad file is a warning, the others are still stored."""
    if not files:
        raise error("choose one or more files to add")
    name = collection_name(workbench, collection)
    paths = [Path(f if isinstance(f, str) else f.name) for f in files]
    reports = workbench.ingest([(p.name, p) for p in paths], name, progress_bridge(progress))
    failed = [r for r in reports if r.status == "error"]
    for report in failed:
        warn(report.message)
    if len(failed) == len(reports):
        raise error("nothing was added: " + "; ".join(r.message for r in failed))
    lines = [f"- **{esc(r.status)}** {esc(r.message)}" for r in reports]
    status = f"Collection **{esc(name)}**:\n" + "\n".join(lines)
    return (status, None, *refresh(workbench, name))


@user_errors
def delete(workbench: Workbench, doc_id: str | None, collection: str):
    if not doc_id:
        raise error("pick a document to delete")
    name = collection_name(workbench, collection)
    doc = workbench.delete(str(doc_id), name)
    return (f"Deleted **{esc(doc['name'])}** and its chunks, vectors and cached artifacts.", *refresh(workbench, name))


@user_errors
def prepare(workbench: Workbench, knobs: KnobSet, methods: list[str] | None, collection: str, *knob_values,
            progress=gr.Progress()):
    if not methods:
        raise error("pick at least one method to prepare")
    name = collection_name(workbench, collection)
    done = workbench.prepare(list(methods), name, knobs.values(*knob_values), progress_bridge(progress))
    return ("\n".join(f"- {esc(line)}" for line in done), *refresh(workbench, name))


@user_errors
def finetune(workbench: Workbench, knobs: KnobSet, method: str | None, collection: str, *knob_values,
             progress=gr.Progress()):
    if not method:
        raise error("pick a method to fine-tune")
    name = collection_name(workbench, collection)
    summary = workbench.finetune(method, name, knobs.values(*knob_values), progress_bridge(progress))
    return (f"- {esc(method)}: {esc(summary)}", *refresh(workbench, name))


@dataclass
class LibraryTab:
    workbench: Workbench
    collection: gr.Dropdown
    files: gr.File
    status: gr.Markdown
    table: gr.Dataframe
    doc_picker: gr.Dropdown
    prepare_methods: gr.CheckboxGroup
    prepare_button: gr.Button
    finetune_method: gr.Dropdown
    finetune_button: gr.Button

    @property
    def refresh_outputs(self):
        return [self.table, self.doc_picker, self.collection]

    def connect_knobs(self, knobs: KnobSet) -> None:
        """Prepare and fine-tune use the knob values set in the Ask tab, so artifacts match what Compare reads."""
        wb, outputs = self.workbench, [self.status, *self.refresh_outputs]
        self.prepare_button.click(lambda m, c, *v, progress=gr.Progress(): prepare(wb, knobs, m, c, *v, progress=progress),
                                  [self.prepare_methods, self.collection, *knobs.components], outputs, **MODEL_QUEUE)
        self.finetune_button.click(lambda m, c, *v, progress=gr.Progress(): finetune(wb, knobs, m, c, *v, progress=progress),
                                   [self.finetune_method, self.collection, *knobs.components], outputs, **MODEL_QUEUE)


def build_library_tab(workbench: Workbench, collection: gr.Dropdown) -> LibraryTab:
    wb = workbench
    with gr.Tab("Library", id="library"):
        gr.Markdown(f"Add documents to the collection chosen above ({', '.join(sorted(SUPPORTED))}). "
                    "They are chunked into LM tokens, embedded and stored once; duplicates are recognised by content.")
        files = gr.File(file_count="multiple", type="filepath", label="Upload documents", elem_id="upload-files")
        status = gr.Markdown(elem_id="library-status")
        table = gr.Dataframe(label="Documents", interactive=False, elem_id="documents-table", wrap=True)
        with gr.Row():
            doc_picker = gr.Dropdown(label="Document", choices=[], scale=3)
            delete_button = gr.Button("Delete document", variant="stop", scale=1)
        preparable = method_choices(lambda cls: cls.has_prepare)
        trainable = method_choices(lambda cls: cls.has_finetune)
        with gr.Accordion("Offline preparation", open=bool(preparable or trainable)):
            gr.Markdown("Some methods precompute artifacts (compressed or binarized caches) or train a small adapter "
                        "per collection. Compare would build missing artifacts on first use; doing it here shows "
                        "progress and the storage it costs. The knob values from the Ask tab apply."
                        + ("" if preparable or trainable else "\n\n*No installed method needs preparation.*"))
            with gr.Row():
                prepare_methods = gr.CheckboxGroup(preparable, value=[v for _, v in preparable], label="Methods to prepare",
                                                   visible=bool(preparable))
                prepare_button = gr.Button("Prepare", visible=bool(preparable))
            with gr.Row():
                finetune_method = gr.Dropdown(trainable, value=trainable[0][1] if trainable else None,
                                              label="Method to fine-tune", visible=bool(trainable))
                finetune_button = gr.Button("Fine-tune", visible=bool(trainable))
    tab = LibraryTab(wb, collection, files, status, table, doc_picker, prepare_methods, prepare_button,
                     finetune_method, finetune_button)
    files.upload(lambda f, c, progress=gr.Progress(): upload(wb, f, c, progress=progress), [files, collection],
                 [status, files, *tab.refresh_outputs], api_name="upload", **MODEL_QUEUE)
    delete_button.click(lambda d, c: delete(wb, d, c), [doc_picker, collection], [status, *tab.refresh_outputs])
    collection.change(lambda c: refresh(wb, c), [collection], tab.refresh_outputs)
    return tab


