"""The Benchmark tab: it builds inside a Blocks and its handler runs the same runner as the CLI."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from ragdemo.ui.bench_tab import build_bench_tab, command_line, estimate, methods_from, run_from_ui
from ragdemo.ui.common import Jobs, cancellable


def test_tab_builds_inside_blocks(tiny_bench):
    with gr.Blocks() as demo:
        with gr.Tabs():
            build_bench_tab(tiny_bench, Jobs())
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"bench-dataset", "bench-methods", "bench-run", "bench-summary", "bench-cancel", "bench-estimate",
            "bench-command"} <= ids
    max_new = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "max new tokens")
    assert max_new.value == tiny_bench.settings.max_new_tokens  # one default for Ask, CLI and bench
    assert max_new.minimum is None and max_new.maximum is None  # Gradio's bounds drew an Error box; ours say why
    summary = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "bench-summary")
    headers = summary.value["headers"]
    assert headers[:3] == ["method", "n", "errors"] and "value kept [95% CI]" in headers  # not Gradio's "1 2 3"


def test_methods_from_checkboxes_and_variants():
    assert methods_from(["rag"], "rag@k=2, closed_book") == ["rag", "rag@k=2", "closed_book"]
    with pytest.raises(Exception, match="at least one method"):
        methods_from([], " ")


def test_handler_runs_a_jsonl_benchmark(tiny_bench, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Where is the tower?", "answers": ["Paris"],
                                "context": "The tower is in Paris."}) + "\n")
    header, table, pareto, storage, needle, files = run_from_ui(
        tiny_bench, "jsonl", str(path), 1, 0, ["closed_book", "rag"], "rag@k=1", "rag", "", "", 3, progress=None)
    assert "reference **rag**" in header
    # labels as summary.md writes them: "closed_book (NLL only)", "(indicative: < 20 questions)" on one question
    assert [m.split(" (")[0] for m in table["method"]] == ["closed_book", "rag", "rag@k=1"]
    assert all("indicative" in m for m in table["method"])
    assert pareto["value"].endswith("quality_vs_ttft.png") and pareto["visible"]
    assert needle["visible"] is False  # no needle plot for a QA dataset
    assert any(f.endswith("results.json") for f in files)
    summary = next(open(f).read() for f in files if f.endswith("summary.md"))
    assert "python -m ragdemo bench --dataset qa.jsonl --n 1 --methods closed_book,rag,rag@k=1 --max-new-tokens 3" \
        in summary and "(the Benchmark tab's run)" in summary  # the results say how to repeat them from a terminal
    with pytest.warns(UserWarning, match="upload a .jsonl"):  # a mistake keeps the previous results on the page
        status, *rest = run_from_ui(tiny_bench, "jsonl", None, 1, 0, ["rag"], "", "rag", "", "", 3, progress=None)
    assert "Not run" in status and all(isinstance(r, type(gr.skip())) for r in rest)


def test_estimate_before_starting_uses_answers_timed_here(tiny_bench):
    assert "unknown" in estimate(tiny_bench, "squad", 10, ["closed_book"], "")
    for seconds in (1.0, 3.0):
        tiny_bench.store.add_run(None, "q", {"method": "closed_book", "total_s": seconds})
    text = estimate(tiny_bench, "squad", 10, ["closed_book", "rag"], "")
    assert "about 26 s for 10 questions" in text and "rag (never timed here)" in text  # 10 x 2 s x 1.3 (NLL pass)


def test_cancel_stops_the_benchmark_and_removes_its_collections(tiny_bench, tmp_path):
    import threading

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"Where is tower {i}?", "answers": ["Paris"],
                                        "context": f"Tower {i} is in Paris."}) + "\n" for i in range(4)))
    flag, steps = threading.Event(), []

    def progress(fraction, message):
        steps.append(message)
        if len(steps) == 3:
            flag.set()  # Cancel pressed during the run

    header, *rest = run_from_ui(tiny_bench, "jsonl", str(path), 4, 0, ["closed_book"], "", "rag", "", "", 2,
                                progress=cancellable(progress, flag))
    assert header.startswith("**Cancelled.**") and len(steps) == 3
    assert not [c for c in tiny_bench.store.collections() if c["name"].startswith("bench-")]


@pytest.mark.parametrize("inputs", [
    ("squad", None, 10, 0, ["closed_book", "rag"], "btr@bits=1, rag@k=2", "rag", "1024", "0,50", 32),
    ("needle", None, 10, 3, ["rag", "lloco"], "", "full_context", "1024,2048", "0,50", 24),
    ("jsonl", "/tmp/upload/my qa.jsonl", 7, 5, ["rag"], "", "rag", "", "", None),
])
def test_command_line_under_the_estimate_is_the_same_run(inputs):
    """What the tab shows parses, with the CLI's own parser, to the arguments the tab's run uses."""
    import html
    import re
    import shlex

    from ragdemo.cli import build_parser

    dataset, upload, n, seed, checked, variants, reference, lengths, depths, max_new = inputs
    shown = command_line(*inputs)
    command = html.unescape(re.search(r"<code>(.*)</code>", shown).group(1))
    assert command.startswith("python -m ragdemo bench ")
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert args.command == "bench" and args.out == "bench_out"
    assert args.dataset == ("my qa.jsonl" if upload else dataset)
    assert args.methods.split(",") == methods_from(checked, variants)
    assert args.reference == reference and args.max_new_tokens == max_new
    if dataset == "needle":  # its questions are lengths x depths; n and seed do not apply
        assert (args.lengths, args.depths, args.n, args.seed) == (lengths, depths, None, 0)
    else:
        assert (args.n, args.seed, args.lengths) == (n, seed, None)
    assert command_line("jsonl", None, 10, 0, ["rag"], "", "rag", "", "", None) == ""  # nothing to run yet
