"""Methods tab: each registered method as a three-line summary (paper, mechanism, measured headline) with its
card (paper, mechanism, exact vs approximated) and knobs folded underneath."""
from __future__ import annotations


import gradio as gr

from ..methods import registry
from ..methods.measured import RESULTS_DIR, measured_run, share
from ..params import knob_table as declared_knob_table
from .knobs import SHARED
from .render import one_liner

SHARED_NOTE = {name: "shared by every method; in the Ask tab 0 = the Settings value" for name in SHARED}


def knob_table(params_cls: type) -> str:
    return declared_knob_table(params_cls, SHARED_NOTE)


def paper_line(card: str, fallback: str) -> str:
    heading = next((line.lstrip("#").strip() for line in card.splitlines() if line.startswith("#")), "")
    return heading or fallback


# SQuAD runs the README reports, newest first: a method's headline comes from the first run that has it
HEADLINE_RUNS = ("issue15_squad/summary.md", "squad_all_summary.md")


def measured_line(name: str) -> str:
    """The measured headline of `name` from assets/results (SQuAD, SmolLM2-135M, reference RAG). Headlines may come
    from different runs, so each one names its run and carries RAG's figure from that same run."""
    runs = [r for r in map(measured_run, HEADLINE_RUNS) if r is not None and name in r.rows]
    run = next((r for r in runs if not scored_only(r, name)), runs[0] if runs else None)
    if run is None:
        return "not in the bundled SQuAD runs yet (see the Benchmark tab)"
    where = f"SQuAD, {run.value(name, 'n')} questions ({run.relative})"
    if scored_only(run, name):
        return f"{where}: scored by the gold answer's NLL only, as the 0% point of context value kept"
    if name == "rag":
        return f"{where}: contains {run.value(name, 'contains')}%, TTFT {run.value(name, 'TTFT s')} s (the reference)"
    # no symbol icons: some fonts lack them
    kept = "0% by definition" if name == "closed_book" else f"{run.value(name, 'value kept')} of RAG's"
    return (f"{where}: contains {run.value(name, 'contains')}% (RAG {run.value('rag', 'contains')}%), context value "
            f"kept {kept}, TTFT {run.value(name, 'TTFT s')} s, "
            f"{speed_against_rag(run.value(name, 'TTFT vs ref'))}")


def scored_only(run, name: str) -> bool:
    """The row was added for scoring ("closed_book (NLL only)"): it generated no answers, so it has no TTFT."""
    return "NLL only" in run.rows[name][0]


def speed_against_rag(ratio_cell: str | None) -> str:
    """The run's 'TTFT vs ref' (TTFT / RAG's TTFT) said as bench-speed and the README say it: x faster than RAG."""
    ratio = share(ratio_cell)
    if not ratio:
        return "speed against RAG not measured"
    if abs(ratio - 1) < 0.005:
        return "as fast as RAG"
    return f"{1 / ratio:.1f}x faster than RAG" if ratio < 1 else f"{ratio:.1f}x slower than RAG"


def method_summary(name: str, cls: type) -> str:
    card = cls.card or ""
    return (f"**{paper_line(card, cls.label or name)}**  \n{one_liner(name)}  \n"
            f"<span style='color:#6b7280'>Measured: {measured_line(name)}</span>")


def method_markdown(name: str, cls: type) -> str:
    steps = [label for flag, label in ((cls.has_prepare, "an offline **Prepare** step (Library tab)"),
                                       (cls.has_finetune, "a per-collection **Fine-tune** step (Library tab)")) if flag]
    extra = f"\n\nHas {' and '.join(steps)}." if steps else ""
    return f"{cls.card or '### ' + (cls.label or name)}{extra}\n\n**Knobs** (`--set {name}.KNOB=VALUE` on the command line)\n\n{knob_table(cls.Params)}"


def build_methods_tab() -> None:
    with gr.Tab("Methods", id="methods"):
        gr.Markdown("Every method answers through the same interface and returns the same record, so the numbers "
                    "on the Ask tab are comparable. Methods are found automatically: adding one is one file. "
                    "Open a method for its card and knobs.")
        for name, cls in registry().items():
            gr.Markdown(method_summary(name, cls), elem_classes=["rd-method-summary"])
            with gr.Accordion(f"{cls.label or name}: details and knobs", open=False):
                gr.Markdown(method_markdown(name, cls))
                for path in card_figures(cls):
                    gr.Image(str(path), label=f"assets/results/{path.relative_to(RESULTS_DIR).as_posix()}",
                             show_label=True, interactive=False, buttons=["fullscreen"])


def card_figures(cls: type) -> list:
    """The method's bundled plots that exist in this checkout (a figure not produced yet is simply not shown)."""
    return [RESULTS_DIR / name for name in cls.figures if (RESULTS_DIR / name).is_file()]
