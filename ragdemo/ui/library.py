"""Library tab: collections (create, rename, delete), upload documents, see what is stored, delete with a
confirmation, and prepare or fine-tune method artifacts with a Cancel button.

One file on purpose, like every tab in ui/: the tab's handlers and the layout that wires them (`LibraryTab`).

Handlers here never raise into Gradio: a mistake is a warning plus a status line next to the button that was
pressed, and the table, picker and collection box keep their values (an exception would turn every output into
an "Error" pill and hide the table)."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..errors import UserError
from ..ingest.readers import SUPPORTED
from ..methods import registry
from ..store.db import RESCORE, check_collection_name
from ..deadline import Deadline
from ..params import KnobError
from ..workbench import Workbench
from .common import (Cancelled, Jobs, cancellable, method_choices, progress_bridge, session_of, user_errors,
                     warn)
from .gpu import JOB_CAP_S, GpuGrant, at_cap, on_gpu
from .knobs import KnobSet
from ..units import plural
from .render import document_table, esc

log = logging.getLogger(__name__)
# One long job or content change at a time (upload, Prepare, fine-tune, benchmark, demo, deletes, renames, the
# retriever); Compare keeps its own queue. A change also waits for the Compares reading the collection
# (Workbench.content), so one Compare sees one state of its documents.
LONG_QUEUE = {"concurrency_limit": 1, "concurrency_id": "long"}


def collection_name(workbench: Workbench, collection: str | None) -> str:
    return check_collection_name((collection or "").strip() or workbench.settings.default_collection)


def collection_names(workbench: Workbench) -> list[str]:
    return [c["name"] for c in workbench.store.collections()] or [workbench.settings.default_collection]


def existing_collection(workbench: Workbench, collection: str | None) -> str:
    """The name, if that collection exists: typing a name never creates one (Create does)."""
    name = collection_name(workbench, collection)
    if name not in {c["name"] for c in workbench.store.collections()}:
        raise UserError(f"there is no collection named {name!r}: create it in the Library tab first")
    return name


def reported(n_outputs: int, let_through: tuple[type, ...] = ()):
    """A handler whose first output is its status line: a UserError (or a bug) becomes a warning and that status;
    the other outputs are left as they are. Errors in `let_through` go up to the caller (a refused knob goes to
    `knob_job`, which also resets its widget)."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Cancelled:
                return _with_status("**Cancelled.** Everything finished before the Cancel is kept; nothing "
                                    "half-written.", n_outputs)
            except let_through:
                raise
            except UserError as exc:
                message = str(exc)
            except Exception as exc:  # a bug must not take the page; the log has the traceback
                log.exception("handler %s failed", fn.__name__)
                message = f"internal error: {type(exc).__name__}: {exc}"
            warn(message)
            return _with_status(f"**Not done:** {esc(message)}", n_outputs)

        return wrapper

    return wrap


def _with_status(status: str, n_outputs: int):
    return status if n_outputs == 1 else (status, *[gr.skip()] * (n_outputs - 1))


def documents_frame(workbench: Workbench, collection: str) -> pd.DataFrame:
    preparable = [name for name, cls in registry().items() if cls.has_prepare]
    headers, rows = document_table(workbench.documents(collection), preparable, workbench.shared_storage(collection))
    return pd.DataFrame(rows, columns=headers)


def document_choices(workbench: Workbench, collection: str) -> list[tuple[str, str]]:
    return [(f"{d['name']} (id {d['id']})", str(d["id"])) for d in workbench.documents(collection)]


@user_errors
def refresh(workbench: Workbench, collection: str):
    """Documents table, the delete picker and the collection list, after anything changed (read only)."""
    name = collection_name(workbench, collection)
    choices = document_choices(workbench, name)
    return (documents_frame(workbench, name), gr.update(choices=choices, value=None),
            gr.update(choices=collection_names(workbench)))


def refresh_quietly(workbench: Workbench, collection: str):
    """refresh() for chained events: a bad name leaves the outputs as they are instead of erroring them."""
    try:
        return refresh(workbench, collection)
    except gr.Error:
        return gr.skip(), gr.skip(), gr.skip()


# ------------------------------------------------------------------ collections
@reported(2)
def create_collection(workbench: Workbench, new_name: str):
    name = check_collection_name((new_name or "").strip())
    if name in {c["name"] for c in workbench.store.collections()}:
        raise UserError(f"a collection named {name!r} already exists")
    workbench.create_collection(name)
    return f"Created collection **{esc(name)}**.", gr.update(choices=collection_names(workbench), value=name)


@reported(2)
def rename_collection(workbench: Workbench, collection: str, new_name: str):
    old = existing_collection(workbench, collection)
    new = check_collection_name((new_name or "").strip())
    workbench.rename_collection(old, new)
    return f"Renamed **{esc(old)}** to **{esc(new)}**.", gr.update(choices=collection_names(workbench), value=new)


@reported(3)
def ask_delete_collection(workbench: Workbench, collection: str):
    name = existing_collection(workbench, collection)
    n = len(workbench.documents(name))
    return (f"Delete collection **{esc(name)}** with its {plural(n, 'document')} and every prepared artifact? This cannot "
            "be undone.", gr.update(visible=True), gr.update(visible=True))


@reported(4)
def delete_collection(workbench: Workbench, collection: str):
    name = existing_collection(workbench, collection)
    workbench.delete_collection(name)
    remaining = [c["name"] for c in workbench.store.collections()]
    if not remaining:  # the app always has a collection to upload into
        remaining = [workbench.create_collection(workbench.settings.default_collection)]
    return (f"Deleted collection **{esc(name)}**.", gr.update(choices=remaining, value=remaining[0]),
            gr.update(visible=False), gr.update(visible=False))


def retrieval_of(workbench: Workbench, collection: str | None):
    """The retriever widgets' values for this collection (left as they are for one that does not exist)."""
    if collection_name(workbench, collection) not in {c["name"] for c in workbench.store.collections()}:
        return gr.skip(), gr.skip()
    settings = workbench.corpus(collection, create=False).retrieval_settings()
    return settings["retriever"], settings["rescore"]


@reported(1)
def set_retrieval(workbench: Workbench, collection: str, retriever: str, rescore: float | None):
    name = existing_collection(workbench, collection)
    settings = workbench.set_retrieval(name, retriever, rescore)  # 0 or 2000 refused with the allowed range
    how = (f"1-bit sign codes, Hamming top k x {settings['rescore']} rescored with the float vectors"
           if settings["retriever"] == "binary" else "exact search over the float vectors")
    return (f"Collection **{esc(name)}** now retrieves with the **{settings['retriever']}** retriever ({how}); "
            "every retrieving method uses it, and each answer's notes name it.")


# -------------------------------------------------------------------- documents
@reported(2)
def upload(workbench: Workbench, files: list[str] | None, collection: str, prepare: bool = True, progress=None):
    """Ingest every uploaded file; a bad file is reported once, the others are still stored, and the file box
    is cleared so the next upload does not send the rejected files again."""
    if not files:
        raise UserError("choose one or more files to add")
    name = existing_collection(workbench, collection)
    paths = [Path(f if isinstance(f, str) else f.name) for f in files]
    try:
        reports = workbench.ingest([(p.name, p) for p in paths], name, progress_bridge(progress), prepare=bool(prepare))
    except UserError as exc:  # the file box is cleared either way: a rejected file is not sent twice
        warn(str(exc))
        return f"**Not added:** {esc(exc)}", None
    failed = [r for r in reports if r.status == "error"]
    for report in failed:
        warn(report.message)
    lines = [report_line(r) for r in reports]
    head = "Nothing was added." if len(failed) == len(reports) else f"Collection **{esc(name)}**:"
    return head + "\n" + "\n".join(lines), None


FILE_WORDS = {"added": "added", "duplicate": "already here", "error": "not added"}


def report_line(report) -> str:
    """A file's report with its outcome in bold; a method's report (prepared, skipped, dropped) is already a
    sentence that starts with the method's name and says what happened."""
    if report.status in FILE_WORDS:
        return f"- **{FILE_WORDS[report.status]}** {esc(report.message)}"
    return f"- {esc(report.message)}"


@reported(3)
def ask_delete_document(workbench: Workbench, doc_id: str | None, collection: str):
    if not doc_id:
        raise UserError("pick a document to delete")
    name = existing_collection(workbench, collection)
    doc = workbench.store.resolve_document(workbench.corpus(name, create=False).collection_id, str(doc_id))
    return (f"Delete **{esc(doc['name'])}** with its chunks, vectors and prepared artifacts?",
            gr.update(visible=True), gr.update(visible=True))


@reported(3)
def delete(workbench: Workbench, doc_id: str | None, collection: str):
    if not doc_id:
        raise UserError("pick a document to delete")
    name = existing_collection(workbench, collection)
    doc = workbench.delete(str(doc_id), name)
    dropped = "".join(f"\n- {esc(line)}" for line in doc["dropped"])
    return (f"Deleted **{esc(doc['name'])}** and its chunks, vectors and cached artifacts.{dropped}",
            gr.update(visible=False), gr.update(visible=False))


@reported(1)
def prepare_uploaded(workbench: Workbench, collection: str, prepare: bool, status: str, progress=None,
                     deadline: Deadline | None = None):
    """After an upload that added documents (its status line says so), build what is missing of every method's
    artifacts at the default knobs, so that no answer waits for them; the lines join the upload's status."""
    if not prepare or "**added**" not in (status or ""):
        return gr.skip()
    name = existing_collection(workbench, collection)
    reports = workbench.prepare_defaults(name, progress_bridge(progress), deadline)
    return (status or "") + "\n" + "\n".join(report_line(r) for r in reports)


def cancel_delete():
    return "Nothing deleted.", gr.update(visible=False), gr.update(visible=False)


# ------------------------------------------------------------------- long jobs
@reported(1, let_through=(KnobError,))
def prepare(workbench: Workbench, knobs: KnobSet, methods: list[str] | None, collection: str, *knob_values,
            progress=None, deadline: Deadline | None = None):
    if not methods:
        raise UserError("pick at least one method to prepare")
    name = existing_collection(workbench, collection)
    done = workbench.prepare(list(methods), name, knobs.values(*knob_values), progress, deadline)
    return "\n".join(f"- {esc(line)}" for line in done)


@reported(1, let_through=(KnobError,))
def finetune(workbench: Workbench, knobs: KnobSet, method: str | None, collection: str, *knob_values,
             progress=None):
    if not method:
        raise UserError("pick a method to fine-tune")
    name = existing_collection(workbench, collection)
    summary = workbench.finetune(method, name, knobs.values(*knob_values), progress)
    return f"- {esc(method)}: {esc(summary)}"


def knob_job(knobs: KnobSet, job) -> tuple:
    """Run `job()` (a status line) for a button that reads the Ask tab's knobs: (status, *knob widgets). A refused
    knob is named in the status next to the button and its widget goes back to the value in force."""
    try:
        return (job(), *knobs.unchanged())
    except KnobError as exc:
        warn(str(exc))
        return (f"**Not done:** {esc(exc)}", *knobs.restored(exc))


def run_job(jobs: Jobs, kind: str, request, progress, job):
    """Run `job(progress)` with a progress callback that stops it at the next step after Cancel."""
    session = session_of(request)
    flag = jobs.flag(session, kind)  # registered by the click (queue=False), before the job waited in the queue
    try:
        return job(cancellable(progress_bridge(progress), flag))
    finally:
        jobs.finish(session, kind)


def cancel_job(jobs: Jobs, kind: str, request) -> str:
    if jobs.cancel(session_of(request), kind):
        return "Cancelling: stops after the current step…"
    return "Nothing to cancel."


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
    prepare_cancel: gr.Button
    prepare_status: gr.Markdown
    finetune_method: gr.Dropdown
    finetune_button: gr.Button
    jobs: Jobs

    @property
    def refresh_outputs(self):
        return [self.table, self.doc_picker, self.collection]

    def connect_knobs(self, knobs: KnobSet) -> None:
        """Prepare and fine-tune use the knob values set in the Ask tab, so artifacts match what Compare reads.
        They run in the long-job queue, not the model queue: the model lock is taken per method step, so a
        Compare from another user waits for one step, not for the whole job."""
        wb, jobs = self.workbench, self.jobs

        grant = GpuGrant(at_cap, JOB_CAP_S)

        # Gradio injects the request and the progress tracker only into parameters before *values
        @on_gpu(wb.content, grant)
        def run_prepare(request: gr.Request, progress=gr.Progress(), *values):
            return knob_job(knobs, lambda: run_job(jobs, "prepare", request, progress,
                                                   lambda p: prepare(wb, knobs, *values, progress=p,
                                                                     deadline=grant.deadline())))

        @on_gpu(wb.content, grant)
        def run_finetune(request: gr.Request, progress=gr.Progress(), *values):
            return knob_job(knobs, lambda: run_job(jobs, "prepare", request, progress,
                                                   lambda p: finetune(wb, knobs, *values, progress=p)))

        def stop(request: gr.Request):
            return cancel_job(jobs, "prepare", request)

        def register(request: gr.Request):
            jobs.start(session_of(request), "prepare")

        for button, fn, picked, api in ((self.prepare_button, run_prepare, self.prepare_methods, "prepare"),
                                        (self.finetune_button, run_finetune, self.finetune_method, "finetune")):
            button.click(register, None, None, queue=False).then(fn, [picked, self.collection, *knobs.components],
                                                                 [self.prepare_status, *knobs.components],
                         show_progress_on=[self.prepare_status], api_name=api, **LONG_QUEUE).then(
                lambda c: refresh_quietly(wb, c), [self.collection], self.refresh_outputs, show_progress="hidden")
        self.prepare_cancel.click(stop, None, [self.prepare_status], queue=False)


def build_library_tab(workbench: Workbench, collection: gr.Dropdown, jobs: Jobs) -> LibraryTab:
    wb = workbench
    with gr.Tab("Library", id="library"):
        with gr.Accordion("Collections: create, rename, delete, retriever", open=False, elem_id="collections-box"):
            with gr.Row(equal_height=True):
                new_name = gr.Textbox(label="Name", placeholder="e.g. biology-notes", scale=3, elem_id="collection-name")
                create_button = gr.Button("Create collection", scale=1, elem_id="create-collection")
                rename_button = gr.Button("Rename the chosen collection to this name", scale=1)
                delete_coll_button = gr.Button("Delete the chosen collection…", variant="stop", scale=1,
                                               elem_id="delete-collection")
            with gr.Row(equal_height=True):
                retriever = gr.Radio(["float", "binary"], value="float", label="Retriever of the chosen collection",
                                     info="float: exact search over the embeddings; binary: 1-bit sign codes (32x "
                                          "smaller), Hamming search, then the top k x rescore rescored with the "
                                          "float vectors", scale=3, elem_id="retriever")
                # a number box without Gradio bounds: Gradio would put an Error box over it; the store says why
                rescore = gr.Number(10, precision=0, label="Rescore (binary)", scale=2, elem_id="rescore",
                                    info=f"candidates = k x rescore; {RESCORE.allowed()}")
                retrieval_button = gr.Button("Apply retriever", scale=1, elem_id="apply-retriever")
            collection_status = gr.Markdown(elem_id="collection-status")
            with gr.Row():
                confirm_coll = gr.Button("Yes, delete the collection", variant="stop", visible=False,
                                         elem_id="confirm-delete-collection")
                keep_coll = gr.Button("Cancel", visible=False)
        gr.Markdown(f"Add documents to the collection chosen above ({', '.join(sorted(SUPPORTED))}). "
                    "They are chunked into LM tokens, embedded and stored once; duplicates are recognised by content.")
        with gr.Row():
            files = gr.File(file_count="multiple", type="filepath", label="Upload documents", elem_id="upload-files",
                            scale=3)
            with gr.Column(scale=2):
                prepare_on_upload = gr.Checkbox(True, label="Prepare every method after upload",
                                                info="builds the offline artifacts now, so no answer waits for them",
                                                elem_id="prepare-on-upload")
                status = gr.Markdown(elem_id="library-status")
        table = gr.Dataframe(label="Documents", interactive=False, elem_id="documents-table", wrap=True)
        with gr.Row(equal_height=True):
            doc_picker = gr.Dropdown(label="Document", choices=[], scale=3, elem_id="doc-picker")
            delete_button = gr.Button("Delete document…", scale=1, elem_id="delete-document")
        with gr.Row():
            delete_status = gr.Markdown(elem_id="delete-status")
            confirm_delete = gr.Button("Yes, delete it", variant="stop", visible=False, elem_id="confirm-delete")
            keep_doc = gr.Button("Cancel", visible=False, elem_id="cancel-delete")
        preparable = method_choices(lambda cls: cls.has_prepare)
        trainable = method_choices(lambda cls: cls.has_finetune)
        with gr.Accordion("Offline preparation", open=False):
            gr.Markdown("Uploads are prepared for every method at its default knobs. Here you can prepare other knob "
                        "values (those set in the Ask tab apply) or train a small adapter per collection. Cancel "
                        "stops after the current step; what was finished is kept.")
            with gr.Row():
                prepare_methods = gr.CheckboxGroup(preparable, value=[v for _, v in preparable], label="Methods to prepare",
                                                   visible=bool(preparable), scale=3)
                prepare_button = gr.Button("Prepare", visible=bool(preparable), scale=1, elem_id="prepare-button")
            with gr.Row():
                finetune_method = gr.Dropdown(trainable, value=trainable[0][1] if trainable else None,
                                              label="Method to fine-tune", visible=bool(trainable), scale=3)
                finetune_button = gr.Button("Fine-tune", visible=bool(trainable), scale=1, elem_id="finetune-button")
            with gr.Row():
                prepare_status = gr.Markdown(elem_id="prepare-status")
                prepare_cancel = gr.Button("Cancel", scale=0, min_width=120, elem_id="prepare-cancel")
    tab = LibraryTab(wb, collection, files, status, table, doc_picker, prepare_methods, prepare_button, prepare_cancel,
                     prepare_status, finetune_method, finetune_button, jobs)

    def then_refresh(event):
        return event.then(lambda c: refresh_quietly(wb, c), [collection], tab.refresh_outputs, show_progress="hidden")

    upload_grant = GpuGrant(at_cap, JOB_CAP_S)

    @on_gpu(wb.content, upload_grant)
    def run_prepare_uploaded(c, p, s, progress=gr.Progress()):
        return prepare_uploaded(wb, c, p, s, progress, upload_grant.deadline())

    # the previous upload's report goes first, so the new upload's progress is not drawn over it; storing is a
    # content change, done here; preparing runs the model (on ZeroGPU, a GPU call of its own)
    then_refresh(files.upload(lambda: "", None, [status], queue=False, show_progress="hidden").then(
        lambda f, c, progress=gr.Progress(): upload(wb, f, c, False, progress=progress),
        [files, collection], [status, files], api_name="upload", show_progress_on=[status], **LONG_QUEUE).then(
        run_prepare_uploaded, [collection, prepare_on_upload, status], [status], api_name="prepare_upload",
        show_progress_on=[status], **LONG_QUEUE))
    delete_button.click(lambda d, c: ask_delete_document(wb, d, c), [doc_picker, collection],
                        [delete_status, confirm_delete, keep_doc])
    then_refresh(confirm_delete.click(lambda d, c: delete(wb, d, c), [doc_picker, collection],
                                      [delete_status, confirm_delete, keep_doc], **LONG_QUEUE))
    keep_doc.click(cancel_delete, None, [delete_status, confirm_delete, keep_doc])
    then_refresh(create_button.click(lambda n: create_collection(wb, n), [new_name], [collection_status, collection]))
    then_refresh(rename_button.click(lambda c, n: rename_collection(wb, c, n), [collection, new_name],
                                     [collection_status, collection], **LONG_QUEUE))
    delete_coll_button.click(lambda c: ask_delete_collection(wb, c), [collection],
                             [collection_status, confirm_coll, keep_coll])
    then_refresh(confirm_coll.click(lambda c: delete_collection(wb, c), [collection],
                                    [collection_status, collection, confirm_coll, keep_coll], **LONG_QUEUE))
    keep_coll.click(lambda: ("Nothing deleted.", gr.update(visible=False), gr.update(visible=False)), None,
                    [collection_status, confirm_coll, keep_coll])
    collection.change(lambda c: refresh_quietly(wb, c), [collection], tab.refresh_outputs, show_progress="hidden")
    collection.change(lambda c: retrieval_of(wb, c), [collection], [retriever, rescore], show_progress="hidden")
    retrieval_button.click(lambda c, r, n: set_retrieval(wb, c, r, n), [collection, retriever, rescore],
                           [collection_status], **LONG_QUEUE)
    return tab
