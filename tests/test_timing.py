"""Timing a class can trust: repeated answers give medians with their range, the page says when other programs
were using the CPU, and the benchmark rotates the method order from question to question."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ragdemo.errors import UserError
from ragdemo.methods.base import TIMED_FIELDS, Result, repeated

QUESTION = "When was the Eiffel Tower completed?"


def test_repeated_keeps_the_first_answer_and_takes_the_median_of_every_time():
    runs = [Result("rag", answer=f"answer {i}", ttft_s=t, total_s=2 * t) for i, t in enumerate((0.30, 0.10, 0.20))]
    merged = repeated(runs, others_cpu=0.05)
    assert merged.answer == "answer 0" and merged.ttft_s == 0.20 and merged.total_s == 0.40
    assert merged.timings["ttft_s"] == [0.30, 0.10, 0.20] and merged.timings["repeats"] == 3
    assert set(TIMED_FIELDS) <= set(merged.timings) and merged.timings["others_cpu"] == 0.05
    assert repeated([Result("rag", ttft_s=1.0), Result("rag", ttft_s=3.0)]).ttft_s == 2.0  # an even count: the mean of two


def test_compare_repeats_each_method_and_records_one_run(tiny_bench, docs_dir):
    tiny_bench.ingest([(p.name, p) for p in docs_dir.iterdir()], prepare=False)
    [once] = tiny_bench.ask(QUESTION, ["rag"])
    [thrice] = tiny_bench.ask(QUESTION, ["rag"], repeats=3)
    assert thrice.answer == once.answer and thrice.timings["repeats"] == 3
    for name in ("ttft_s", "total_s", "retrieve_s"):
        runs = thrice.timings[name]
        assert len(runs) == 3 and getattr(thrice, name) == pytest.approx(sorted(runs)[1], abs=1e-6)
    assert once.timings["repeats"] == 1  # one run is labelled as one sample too
    assert len(tiny_bench.runs()) == 2  # History holds one row per method per Compare, not one per run
    with pytest.raises(UserError, match="repeats must be one of 1, 3, 5"):
        tiny_bench.ask(QUESTION, ["rag"], repeats=2)


def test_cpu_meter_tells_other_programs_load_from_its_own(monkeypatch):
    import ragdemo.machine as machine

    busy = iter([100.0, 100.0 + 0.2 + 1.2])  # the machine: this process's 0.2 s and others' 1.2 s of CPU
    own = iter([5.0, 5.2])
    monkeypatch.setattr(machine, "_machine_busy_s", lambda: next(busy))
    monkeypatch.setattr(machine, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    clock = iter([10.0, 11.0])
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(clock))
    with machine.CpuMeter() as meter:
        pass
    assert meter.share.others == pytest.approx(0.6)  # 1.2 s of 2 cores x 1 s
    assert meter.share.unreliable and "unreliable right now" in meter.share.warning()
    assert not machine.CpuShare(1.0, 0.1).unreliable and machine.CpuShare(1.0, 0.1).warning() == ""
    assert not machine.CpuShare(1.0, None).unreliable  # where /proc/stat cannot be read, nothing is claimed


def test_cpu_meter_sees_a_real_busy_program():
    from ragdemo.machine import CpuMeter

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        with CpuMeter() as meter:
            time.sleep(1.5)  # this process idles: the busy core is someone else's
    finally:
        spinner.kill()
    assert meter.share.others is not None and meter.share.others >= 0.3  # one of 2 cores, at least


def test_cards_show_the_median_range_and_a_busy_warning():
    from ragdemo.ui.render import Card, render_cards

    calm = repeated([Result("rag", answer="x", ttft_s=t, total_s=t) for t in (0.3, 0.1, 0.2)], others_cpu=0.05)
    html = render_cards([Card("rag", "RAG", status="done", result=calm)])
    assert "median of 3 runs" in html and "100 ms–300 ms" in html and "rd-busy" not in html
    busy = repeated([Result("rag", answer="x", ttft_s=0.2)], others_cpu=0.7)
    html = render_cards([Card("rag", "RAG", status="done", result=busy)])
    assert "rd-busy" in html and "70%" in html and "one noisy sample" in html


def test_cli_repeats_and_refuses_other_counts(tiny_settings, docs_dir, capsys, monkeypatch):
    from ragdemo import cli

    monkeypatch.setenv("RAGDEMO_HOME", str(tiny_settings.home))
    common = ["--model", tiny_settings.model_id, "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "4"]
    assert cli.main(["ingest", *map(str, docs_dir.iterdir()), "--no-prepare", *common]) == 0
    assert cli.main(["ask", QUESTION, "--methods", "rag", "--repeat", "3", *common]) == 0
    assert "TTFT" in (out := capsys.readouterr().out) and "(median of 3:" in out
    assert cli.main(["ask", QUESTION, "--methods", "rag", "--repeat", "2", *common]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_the_benchmark_rotates_the_method_order_per_question(tiny_bench, monkeypatch):
    from ragdemo.bench import runner
    from ragdemo.bench.datasets import Dataset, Haystack, Question

    order: list[list[str]] = []
    real = runner._ask_one

    def spy(spec, question, corpus, max_new_tokens):
        if not order or order[-1][0] != question.id:
            order.append([question.id])
        order[-1].append(spec.label)
        return real(spec, question, corpus, max_new_tokens)

    monkeypatch.setattr(runner, "_ask_one", spy)
    haystack = Haystack("h", [("a.txt", "The tower is in Paris. " * 20)],
                        [Question(f"q{i}", "Where is the tower?", ["Paris"]) for i in range(3)])
    specs = runner.parse_method_specs("rag,rag@k=1")
    runner.run_bench(tiny_bench, Dataset("d", [haystack]), specs, max_new_tokens=2)
    firsts = [labels[1] for labels in order]
    assert len(set(firsts)) == 3  # closed_book, rag, rag@k=1 each answer first once
