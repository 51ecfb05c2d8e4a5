"""Methods tab: each registered method as a three-line summary (paper, mechanism, measured headline) with its
card (paper, mechanism, exact vs approximated) and knobs folded underneath."""
from __future__ import annotations


import gradio as gr

from ..methods import registry
from ..methods.measured import RESULTS_DIR, measured_run
from .knobs import SHARED, knob_defaults, knob_help, knob_label
from .render import one_liner


def knob_table(params_cls: type) -> str:
    rows = [f"| {knob_label(name)} | `{name}` | `{default!r}` | "
            + ("shared: 0 = the Settings value" if name in SHARED else knob_help(params_cls, name).replace("|", "/"))
            + " |"
            for name, default in knob_defaults(params_cls)]
    return "| knob | name | default | what it does |\n|---|---|---|---|\n" + "\n".join(rows)


def paper_line(card: str, fallback: str) -> str:
    heading = next((line.lstrip("#").strip() for line in card.splitlines() if line.startswith("#")), "")
    return heading or fallback


# SQuAD runs the README reports, newest first: a method's headline comes from the first run that has it
HEADLINE_RUNS = ("issue15_squad/summary.md", "squad_all_summary.md")


def measured_line(name: str) -> str:
    """The measured headline of `name` from assets/results (SQuAD, SmolLM2-135M, reference RAG)."""
    run = next((r for r in map(measured_run, HEADLINE_RUNS) if r is not None and name in r.rows), None)
    if run is None:
        return "not in the bundled SQuAD runs yet (see the Benchmark tab)"

    def cell(column: str) -> str | None:
        return run.value(name, column)

    return (f"SQuAD, {cell('n')} questions: contains {cell('contains')}%, context value kept {cell('value kept')} of "
            f"RAG's, TTFT {cell('TTFT s')} s ({cell('TTFT vs ref')} RAG) ({run.relative})")  # no symbol icons: some fonts lack them


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
