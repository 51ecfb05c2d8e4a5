"""Benchmark tab: pick a dataset, n and methods; the runner (same code as `python -m ragdemo bench`) does the rest."""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ..bench.command import run_benchmark
from ..bench.runner import MD_HEADERS, _fmt, summary_columns
from ..errors import UserError
from ..methods import registry
from .common import MODEL_QUEUE, progress_bridge, user_errors

DATASETS = [("SQuAD v1.1 dev sample (6 whole articles)", "squad"), ("Needle in a haystack (Paul Graham essays)", "needle"),
            ("My JSONL file", "jsonl")]
DEFAULT_METHODS = ["closed_book", "full_context", "rag"]
HELP = """Runs the chosen methods on real QA data, on fresh collections that are removed afterwards (your library is
untouched). **EM / F1 / contains** score the generated answers; **value kept** compares teacher-forced NLLs of the gold
answer: 0% = closed book, 100% = the reference. On a 2-core CPU a SQuAD question takes a few seconds per method, and
full context (up to 8k tokens) far longer: start with n = 10. The same run on the command line:
`python -m ragdemo bench --dataset squad --n 10 --methods closed_book,rag --out bench_out`."""


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


def summary_frame(run) -> pd.DataFrame:
    cols = summary_columns(run)
    return pd.DataFrame([[_fmt(row[c], c) for c in cols] for row in run.summary], columns=[MD_HEADERS[c] for c in cols])


@user_errors
def run_from_ui(workbench, dataset: str, jsonl_file, n, seed, checked, variants, reference, lengths, depths,
                max_new_tokens, progress=gr.Progress()):
    if dataset == "jsonl":
        if not jsonl_file:
            raise UserError("upload a .jsonl file of {question, answers, context?, doc?} first")
        dataset = str(jsonl_file)
    out = Path(workbench.settings.home) / "bench" / time.strftime("%Y%m%d-%H%M%S")
    run, written = run_benchmark(
        workbench, dataset, out, methods_from(checked, variants), n=int(n) if n else None, seed=int(seed or 0),
        lengths=_numbers(lengths, "lengths"), depths=_numbers(depths, "depths"), reference=reference,
        max_new_tokens=int(max_new_tokens) if max_new_tokens else None, progress=progress_bridge(progress),
        extra_meta={"command": "Benchmark tab"})
    images = {p.name: str(p) for p in written if p.suffix == ".png"}
    header = (f"**{run.meta['description']}** · model {run.meta['model']} · reference **{run.meta['reference']}** · "
              f"{run.meta['seconds']:.0f} s · saved in `{out}`")
    return (header, summary_frame(run), images.get("quality_vs_ttft.png"), images.get("storage.png"),
            images.get("needle_heatmap.png"), [str(p) for p in written if p.suffix != ".png"])


def build_bench_tab(workbench) -> None:
    """Call inside the app's gr.Blocks / gr.Tabs."""
    names = list(registry())
    with gr.Tab("Benchmark", id="benchmark"):
        gr.Markdown(HELP)
        with gr.Row():
            dataset = gr.Radio([(label, value) for label, value in DATASETS], value="squad", label="Dataset",
                               elem_id="bench-dataset")
            jsonl_file = gr.File(label="JSONL file (for 'My JSONL file')", file_types=[".jsonl"], type="filepath")
        with gr.Row():
            n = gr.Number(10, precision=0, minimum=1, label="questions (n)", elem_id="bench-n")
            seed = gr.Number(0, precision=0, label="seed")
            max_new = gr.Number(24, precision=0, minimum=1, label="max new tokens")
            reference = gr.Radio(["rag", "full_context"], value="rag", label="reference for value kept")
        methods = gr.CheckboxGroup(names, value=[m for m in DEFAULT_METHODS if m in names], label="Methods",
                                   elem_id="bench-methods")
        variants = gr.Textbox(label="Method variants (optional)", placeholder="btr@bits=1, btr@bits=8, rag@k=2")
        with gr.Accordion("Needle settings", open=False):
            lengths = gr.Textbox("1024,2048,4096", label="context lengths (tokens)")
            depths = gr.Textbox("0,25,50,75,100", label="needle depths (%)")
        run_button = gr.Button("Run benchmark", variant="primary", elem_id="bench-run")
        header = gr.Markdown()
        table = gr.Dataframe(label="Summary (means)", interactive=False, elem_id="bench-summary", wrap=True)
        with gr.Row():
            pareto = gr.Image(label="Quality vs TTFT", type="filepath")
            storage = gr.Image(label="Storage per method", type="filepath")
            needle = gr.Image(label="Needle heatmap", type="filepath")
        files = gr.File(label="results.json, summary.csv, summary.md", file_count="multiple")
        run_button.click(lambda *a, progress=gr.Progress(): run_from_ui(workbench, *a, progress=progress),
                         [dataset, jsonl_file, n, seed, methods, variants, reference, lengths, depths, max_new],
                         [header, table, pareto, storage, needle, files], **MODEL_QUEUE)
