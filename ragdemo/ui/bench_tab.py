"""Benchmark tab: pick a dataset, n and methods; the runner (same code as `python -m ragdemo bench`) does the rest."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ..bench.command import equivalent_command, run_benchmark
from ..bench.report import column_header, fmt_cell, reference_name, row_label, summary_columns
from ..bench.summary import SUMMARY_COLUMNS
from ..config import setting_spec
from ..errors import UserError
from ..params import Spec, checked as checked_value
from ..methods import registry
from .gpu import JOB_CAP_S, GpuGrant, on_gpu
from .common import Cancelled, Jobs, cancellable, progress_bridge, session_of, warn
from ..units import fmt_duration, plural
from .render import esc

log = logging.getLogger(__name__)
DATASETS = [("SQuAD v1.1 dev sample (6 whole articles)", "squad"), ("Needle in a haystack (Paul Graham essays)", "needle"),
            ("My JSONL file", "jsonl")]
DEFAULT_METHODS = ["closed_book", "rag", "retro"]
NLL_FACTOR = 1.3  # each benchmark answer also scores the gold answer's NLL: roughly a third more time
HELP = """Runs the chosen methods on real QA data, on fresh collections that are removed afterwards (your library is
untouched). **EM / F1 / contains** score the generated answers; **value kept** compares teacher-forced NLLs of the gold
answer: 0% = closed book, 100% = the reference. On a 2-core CPU a SQuAD question takes a few seconds per method, and
full context (up to 8k tokens) far longer: start with n = 10 (the estimate below uses answers timed on this
machine). Cancel stops after the current question and removes the benchmark's collections. Below the estimate: the
same run on the command line."""


def _numbers(text: str, what: str) -> list[float] | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [float(x) if "." in x else int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{what}: comma-separated numbers, e.g. 1024,2048") from None


def methods_from(checked: list[str] | None, variants: str) -> list[str]:
    """Checked methods plus free-text variants such as `btr@bits=1, btr@bits=8`."""
    extra = [v.strip() for v in (variants or "").split(",") if v.strip()]
    methods = list(checked or []) + [v for v in extra if v not in (checked or [])]
    if not methods:
        raise UserError("choose at least one method")
    return methods


def estimate_seconds(workbench, dataset: str, n, checked, variants) -> tuple[float, list[str]]:
    """(expected seconds, methods never timed here) from this machine's recent answers: the mean total time per
    method, plus the NLL pass. Seconds are 0 when no method was timed."""
    methods = [m.split("@")[0] for m in methods_from(checked, variants)]
    questions = int(n or 0) if dataset != "needle" else 15
    seconds = workbench.answer_seconds()
    known = [seconds[m] for m in methods if m in seconds]
    return questions * sum(known) * NLL_FACTOR, [m for m in methods if m not in seconds]


def estimate(workbench, dataset: str, n, checked, variants) -> str:
    """Expected duration from this machine's recent answers (mean total time per method, plus the NLL pass)."""
    try:
        total, missing = estimate_seconds(workbench, dataset, n, checked, variants)
    except (UserError, ValueError):
        return ""
    questions = int(n or 0) if dataset != "needle" else 15
    if not total:
        return "**Estimated duration:** unknown (none of these methods has answered on this machine yet)."
    unknown = f"; plus {', '.join(missing)} (never timed here)" if missing else ""
    return f"**Estimated duration:** about {fmt_duration(total)} for {plural(questions, 'question')}{esc(unknown)}, preparation not included."


def summary_frame(run) -> pd.DataFrame:
    """The run's table exactly as its summary.md gives it (one formatter for every screen)."""
    cols, reference = summary_columns(run), reference_name(run)
    rows = [[row_label(run, row) if c == "method" else fmt_cell(row, c, reference) for c in cols] for row in run.summary]
    return pd.DataFrame(rows, columns=[column_header(c, reference) for c in cols])


def run_from_ui(workbench, dataset, jsonl_file, n, seed, checked, variants, reference, lengths, depths,
                max_new_tokens, progress=None):
    """The Run button: never raises into Gradio, so a mistake leaves the previous results on the page."""
    empty = (gr.skip(),) * 5
    try:
        return _run(workbench, dataset, jsonl_file, n, seed, checked, variants, reference, lengths, depths,
                    max_new_tokens, progress)
    except Cancelled:
        return ("**Cancelled.** The benchmark's collections were removed; nothing was saved.", *empty)
    except UserError as exc:
        message = str(exc)
    except Exception as exc:  # a bug must not take the page; the log has the traceback
        log.exception("benchmark failed")
        message = f"internal error: {type(exc).__name__}: {exc}"
    warn(message)
    return (f"**Not run:** {esc(message)}", *empty)


@dataclass
class BenchRequest:
    """What the tab's inputs ask for, checked once: the run and its command-line twin are built from it."""

    dataset: str
    methods: list[str]
    n: int | None
    seed: int
    lengths: list | None
    depths: list | None
    reference: str
    max_new_tokens: int | None

    def command(self, out: str | Path) -> str:
        dataset = Path(self.dataset).name if self.dataset not in ("squad", "needle") else self.dataset
        return equivalent_command(dataset, self.methods, str(out), self.n, self.seed, self.lengths, self.depths,
                                  self.reference, self.max_new_tokens)


QUESTIONS = Spec(int, label="questions (n)", min=1)
SEED = Spec(int, label="seed", min=0)


def bench_request(dataset: str, jsonl_file, n, seed, checked, variants, reference, lengths, depths,
                  max_new_tokens) -> BenchRequest:
    if dataset == "jsonl":
        if not jsonl_file:
            raise UserError("upload a .jsonl file of {question, answers, context?, doc?} first")
        dataset = str(jsonl_file)
    return BenchRequest(dataset, methods_from(checked, variants), _blank_or(QUESTIONS, "n", n),
                        checked_value(SEED, "seed", seed or 0), _numbers(lengths, "lengths"), _numbers(depths, "depths"),
                        reference or "rag", _blank_or(setting_spec("max_new_tokens"), "max_new_tokens", max_new_tokens))


def _blank_or(spec: Spec, name: str, value):
    """A blank box means the default (every question, the Settings' answer length); anything else is checked."""
    return None if value is None or str(value).strip() == "" else checked_value(spec, name, value)


def command_line(*inputs) -> str:
    """The run's twin on the command line, shown under the estimate (the tab's inputs, in run_from_ui's order)."""
    try:
        request = bench_request(*inputs)
    except UserError:
        return ""
    # <code> rather than backticks: a file name or variant with a backtick must not end the span, and the
    # escaped entities decode in HTML (in a Markdown code span they would show as written)
    return f"**The same run on the command line:** <code>{esc(request.command('bench_out'))}</code>"


def _run(workbench, dataset: str, jsonl_file, n, seed, checked, variants, reference, lengths, depths,
         max_new_tokens, progress=None):
    request = bench_request(dataset, jsonl_file, n, seed, checked, variants, reference, lengths, depths,
                            max_new_tokens)
    out = Path(workbench.settings.home) / "bench" / time.strftime("%Y%m%d-%H%M%S")
    run, written = run_benchmark(
        workbench, request.dataset, out, request.methods, n=request.n, seed=request.seed, lengths=request.lengths,
        depths=request.depths, reference=request.reference, max_new_tokens=request.max_new_tokens,
        progress=progress, extra_meta={"command": f"{request.command(out)} (the Benchmark tab's run)"})
    images = {p.name: str(p) for p in written if p.suffix == ".png"}
    header = (f"**{esc(run.meta['description'])}** · model {esc(run.meta['model'])} · reference "
              f"**{esc(run.meta['reference'])}** · {run.meta['seconds']:.0f} s · saved in `{esc(out)}`")
    # a plot that has nothing to show is hidden rather than drawn empty
    plots = [gr.update(value=images.get(name), visible=name in images)
             for name in ("quality_vs_ttft.png", "storage.png", "needle_heatmap.png")]
    return (header, summary_frame(run), *plots, [str(p) for p in written if p.suffix != ".png"])


def build_bench_tab(workbench, jobs: Jobs) -> None:
    """Call inside the app's gr.Blocks / gr.Tabs."""
    names = list(registry())
    with gr.Tab("Benchmark", id="benchmark") as tab:
        gr.Markdown(HELP)
        with gr.Row():
            dataset = gr.Radio([(label, value) for label, value in DATASETS], value="squad", label="Dataset",
                               elem_id="bench-dataset")
            jsonl_file = gr.File(label="JSONL file (for 'My JSONL file')", file_types=[".jsonl"], type="filepath")
        with gr.Row():
            # no Gradio bounds (they would put an Error box over the field): bench_request checks and says why
            n = gr.Number(10, precision=0, label="questions (n)", elem_id="bench-n")
            seed = gr.Number(0, precision=0, label="seed")
            max_new = gr.Number(workbench.settings.max_new_tokens, precision=0, label="max new tokens",
                                info="the same default as the Ask tab and the CLI", elem_id="bench-max-new")
            reference = gr.Radio(["rag", "full_context"], value="rag", label="reference for value kept")
        methods = gr.CheckboxGroup(names, value=[m for m in DEFAULT_METHODS if m in names], label="Methods",
                                   elem_id="bench-methods")
        variants = gr.Textbox(label="Method variants (optional)", placeholder="btr@bits=1, btr@bits=8, rag@k=2")
        with gr.Accordion("Needle settings", open=False):
            lengths = gr.Textbox("1024,2048,4096", label="context lengths (tokens)")
            depths = gr.Textbox("0,25,50,75,100", label="needle depths (%)")
        estimate_md = gr.Markdown(elem_id="bench-estimate")
        command_md = gr.Markdown(elem_id="bench-command")
        with gr.Row(equal_height=True):
            run_button = gr.Button("Run benchmark", variant="primary", elem_id="bench-run", scale=0, min_width=200)
            cancel_button = gr.Button("Cancel", elem_id="bench-cancel", scale=0, min_width=120)
            header = gr.Markdown(elem_id="bench-status")
        # the summary's own headers before the first run (an empty table would show Gradio's "1 2 3")
        table = gr.Dataframe(pd.DataFrame(columns=[column_header(c) for c in SUMMARY_COLUMNS if c != "keywords"]),
                             label="Summary (means): click a header to sort, type to filter", interactive=False,
                             elem_id="bench-summary", wrap=False, show_search="filter")
        with gr.Row():
            # show_label=False: Gradio's label badge would cover the title drawn inside each plot
            pareto = gr.Image(label="Quality vs TTFT", type="filepath", show_label=False, visible=False)
            storage = gr.Image(label="Storage per method", type="filepath", show_label=False, visible=False)
            needle = gr.Image(label="Needle heatmap", type="filepath", show_label=False, visible=False)
        files = gr.File(label="results.json, summary.csv, summary.md", file_count="multiple")

        # unknown durations ask for the cap; a benchmark longer than its grant is cut by ZeroGPU (bench is for a
        # private Space: RAGDEMO_SHARED turns it off)
        grant = GpuGrant(lambda request, progress, dataset, jsonl, n, seed, checked, variants, *rest:
                         estimate_seconds(workbench, dataset, n, checked, variants)[0] or JOB_CAP_S, JOB_CAP_S)

        # Gradio injects the request and the progress tracker only into parameters before *args
        @on_gpu(workbench.content, grant)
        def run(request: gr.Request, progress=gr.Progress(), *args):
            session = session_of(request)
            flag = jobs.flag(session, "bench")  # registered by the click, so a Cancel during the queue wait counts
            try:
                return run_from_ui(workbench, *args, progress=cancellable(progress_bridge(progress), flag))
            finally:
                jobs.finish(session, "bench")

        def cancel(request: gr.Request):
            return ("Cancelling: stops after the current question…" if jobs.cancel(session_of(request), "bench")
                    else "Nothing to cancel.")

        # The long-job queue, not the model queue: the runner takes the model lock per question, so another
        # user's Compare waits for one answer, not for the whole benchmark.
        def register(request: gr.Request):
            jobs.start(session_of(request), "bench")

        run_button.click(register, None, None, queue=False).then(
            run, [dataset, jsonl_file, n, seed, methods, variants, reference, lengths, depths, max_new],
                         [header, table, pareto, storage, needle, files], show_progress_on=[header],
                         api_name="bench", concurrency_limit=1, concurrency_id="long")
        cancel_button.click(cancel, None, [header], queue=False)
        gr.on([dataset.change, n.change, methods.change, variants.change],
              lambda d, k, m, v: estimate(workbench, d, k, m, v), [dataset, n, methods, variants], [estimate_md],
              show_progress="hidden")
        tab.select(lambda d, k, m, v: estimate(workbench, d, k, m, v), [dataset, n, methods, variants], [estimate_md],
                   show_progress="hidden")
        inputs = [dataset, jsonl_file, n, seed, methods, variants, reference, lengths, depths, max_new]
        gr.on([tab.select] + [box.change for box in inputs], command_line, inputs, [command_md], show_progress="hidden")
