"""`python -m ragdemo results`: the one results suite every screen quotes.

One command runs every benchmark whose figures a card, the Methods tab, the README or docs/RESULTS.md shows, in
one process on one machine, and stamps the run (machine, CPU flags, dtype, load at start and end, date, commit,
wall time, the command). Screens read only this folder, so no screen mixes runs; a new run replaces it whole.
`--quick` runs every section on a few questions and small collections: the same files, for a test to check
that every quoted table is produced (its figures mean nothing).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..machine import load_average, stamp
from .scaling import QUICK_SCALING, ScalingPlan
from .scratch import scratch_workbench

REPO = Path(__file__).resolve().parents[2]
SUITE_DIR = REPO / "assets" / "results" / "suite"
STAMP_FILE = "suite.json"

# The main SQuAD run: every method at its defaults and the variants the cards discuss, on the same questions,
# in one run (rotated order), so every comparison on a card is within one run.
# BTR's default is the pick of a rule fixed before the runs (bench/defaults.py): chosen on the main run's
# questions, checked on the held-out ones. A first attempt among the 1-bit variants without training failed the
# check (every one of them stays below the bar on the held-out questions), so the candidates are now the trained
# reader (`train=1`, the paper's BTR trains its reader) at the two fastest layouts; the untrained variants stay as
# rivals the pick must not be beaten by. They pin `lora=0`: with the default `lora=1` they would read the adapter
# a trained row stored for the same layout. 1-bit only (2 bits ran as a candidate once and is now a variant).
BTR_CANDIDATES = ["btr@train=1", "btr@split=12@train=1"]
BTR_DEFAULT = "btr@train=1"  # the shipped knobs, read with the adapter Fine-tune trains (`train` itself stays off)
BTR_UNTRAINED = ["btr@lora=0", "btr@split=6@query_aware=0@lora=0", "btr@split=6@lora=0",
                 "btr@split=12@query_aware=0@lora=0", "btr@split=12@lora=0", "btr@split=18@query_aware=0@lora=0",
                 "btr@split=24@lora=0"]
BTR_BAR = 0.95  # value kept the rule asks for: the quality target for BTR
# the row that stands for a method at its defaults where the run holds several: BTR's defaults on a collection
# never fine-tuned read no adapter, as `lora=0` does
DEFAULT_ROWS = {"btr": "btr@lora=0"}


def default_row(method: str) -> str:
    """The label of the row that stands for `method` at its defaults."""
    return DEFAULT_ROWS.get(method, method)


SQUAD_METHODS = [
    "closed_book", "full_context", "rag", "rag@join=1", "retro", "jrt", *BTR_UNTRAINED, *BTR_CANDIDATES,
    "btr@bits=2",
    "lloco", "lloco@c=8", "lloco@storage=fp16",
    "cacheblend@r=0", "cacheblend", "cacheblend@r=1", "cacheblend@storage=fp16",
    "lingua", "lingua@question_aware=1",
    # the answer-length study: are longer answers more complete without hurting the comparison?
    "rag@max_new_tokens=48", "lloco@max_new_tokens=48",
]
SQUAD_LIMITS = {"full_context": 20}  # reads ~7k tokens per question: 20 questions give its figure in minutes
# Defaults chosen on the main run's questions are confirmed here, on other articles and other questions.
HELDOUT_METHODS = ["rag", *BTR_UNTRAINED, *BTR_CANDIDATES, "lingua", "lingua@spread=0@unit=token",
                   "cacheblend", "cacheblend@storage=fp16", "lloco", "lloco@storage=fp16"]


@dataclass
class Plan:
    """How big each section is: the full suite, or the quick one a test runs."""

    questions: int
    articles: int
    full_context_limit: int
    lora_steps: int | None  # None = each method's default training length
    storage_tokens: int
    retriever_questions: int
    speed_quick: bool
    scaling: ScalingPlan = field(default_factory=ScalingPlan)  # the ladders of bench-scaling
    overrides: dict = field(default_factory=dict)  # {method: {knob: value}} over every variant (a tiny model's split)


# sized to run in about an hour on a 2-core CPU: 40 questions per variant (intervals say what that buys)
FULL = Plan(questions=40, articles=2, full_context_limit=20, lora_steps=None, storage_tokens=20_000,
            retriever_questions=100, speed_quick=False, scaling=ScalingPlan(questions=6, facts=3))
QUICK = Plan(questions=3, articles=1, full_context_limit=2, lora_steps=2, storage_tokens=2_000,
             retriever_questions=5, speed_quick=True, scaling=QUICK_SCALING)


@dataclass
class Section:
    name: str  # its folder under the suite
    title: str
    run: Callable  # (settings, folder, plan, progress) -> list of files written


def _bench(methods: list[str], seed: int, limits: dict | None = None):
    def run(settings, folder: Path, plan: Plan, progress) -> list[Path]:
        from .command import run_benchmark

        knobs = {name: {"lora_steps": plan.lora_steps} for name in ("btr", "lloco")} if plan.lora_steps else {}
        limits_now = {m: min(n, plan.full_context_limit) for m, n in (limits or {}).items()}
        with scratch_workbench(settings, f"suite-{folder.name}") as scratch:
            _, written = run_benchmark(scratch, "squad", folder, methods, knobs, limits_now, n=plan.questions,
                                       seed=seed, articles=plan.articles, progress=progress, overrides=plan.overrides,
                                       extra_meta={"command": f"part of `python -m ragdemo results` ({folder.name})"})
        return written
    return run


def _speed(settings, folder: Path, plan: Plan, progress) -> list[Path]:
    import contextlib
    import io

    from .speed import run_speed_bench, speed_record

    with scratch_workbench(settings, "suite-speed") as scratch:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            found = run_speed_bench(scratch, plan.speed_quick)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "speed.txt").write_text(text.getvalue())
    (folder / "speed.json").write_text(json.dumps(speed_record(found), indent=1))
    return [folder / "speed.txt", folder / "speed.json"]


def _scaling(settings, folder: Path, plan: Plan, progress) -> list[Path]:
    import contextlib
    import dataclasses
    import io

    from .scaling import write_scaling
    from .scaling_run import run_scaling_bench

    ladders = dataclasses.replace(plan.scaling, overrides=plan.overrides)
    with scratch_workbench(settings, "suite-scaling") as scratch:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            record = run_scaling_bench(scratch, ladders, progress=progress)
    return write_scaling(record, text.getvalue(), folder)


def _storage(settings, folder: Path, plan: Plan, progress) -> list[Path]:
    from .storage import DEFAULT_SPECS, run_storage_bench, write_storage

    specs = ",".join(spec + "".join(f"@{k}={v}" for k, v in plan.overrides.get(spec.split("@")[0], {}).items())
                     for spec in DEFAULT_SPECS.split(","))
    rows = run_storage_bench(settings, specs, plan.storage_tokens, progress, articles=plan.articles)
    return write_storage(rows, folder, {"min_tokens": plan.storage_tokens, "methods": specs})


def _retrievers(settings, folder: Path, plan: Plan, progress) -> list[Path]:
    from .retrievers import run_retriever_bench, write_retrievers

    rows = run_retriever_bench(settings, [plan.articles, None], plan.retriever_questions, 5, None, 0, progress)
    return write_retrievers(rows, folder, {"n": plan.retriever_questions, "k": 5, "seed": 0,
                                           "articles": f"{plan.articles},all"})


SECTIONS = [
    Section("squad", "Every method on SQuAD v1.1 dev: quality, speed and storage", _bench(SQUAD_METHODS, 0, SQUAD_LIMITS)),
    Section("heldout", "Defaults checked on other articles and questions", _bench(HELDOUT_METHODS, 1)),
    Section("speed", "Where the time goes on this machine (bench-speed)", _speed),
    Section("scaling", "Where each method wins: cost as the context grows (bench-scaling)", _scaling),
    Section("storage", "Every byte each method keeps (bench-storage)", _storage),
    Section("retrievers", "Binary against float retrieval (bench-retrievers)", _retrievers),
]


def run_suite(settings, out: Path = SUITE_DIR, quick: bool = False, command: str = "", sections: list[str] | None = None,
              plan: Plan | None = None, progress=None) -> dict:
    """Run the sections into a fresh `out` (a previous suite there is replaced whole, never mixed with) and write
    its stamp. Returns the stamp."""
    from ..models import Models

    plan = plan or (QUICK if quick else FULL)
    chosen = [s for s in SECTIONS if sections is None or s.name in sections]
    lm = Models(settings).lm
    record = {**stamp(REPO, command, lm), "quick": quick, "sections": {}}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    for index, section in enumerate(chosen):
        say = _scaled(progress, index, len(chosen), section.name)
        if say:
            say(0.0, section.title)
        began = time.perf_counter()
        written = section.run(settings, staging / section.name, plan, say)
        record["sections"][section.name] = {"title": section.title, "seconds": round(time.perf_counter() - began, 1),
                                            "files": sorted(p.relative_to(staging).as_posix() for p in written)}
    record.update(load_end=load_average(), wall_s=round(time.perf_counter() - started, 1))
    (staging / STAMP_FILE).write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)  # only now: a failed run leaves the previous suite in place
    staging.rename(out)
    return record


def _scaled(progress, index: int, count: int, name: str):
    if progress is None:
        return None
    return lambda fraction, message: progress((index + fraction) / count, f"{name}: {message}")
