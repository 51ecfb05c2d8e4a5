"""Every bad input refused the same way wherever it enters (issue 31): the command line (`--set`, `--max-new-tokens`,
bench variants), the UI handlers (Ask knobs, Settings, Library's Prepare, the Benchmark tab) and the bench specs.
Each case checks the one sentence that names the knob, the value and what is allowed; the CLI's single `error:`
line and exit status 2; that a UI handler raises nothing (so Gradio draws no Error box), says why next to the
button and puts a refused knob back to the value in force; and that nothing stored changed."""
from __future__ import annotations

import contextlib
import io
from html import unescape
from dataclasses import dataclass

import gradio as gr
import pytest

from ragdemo.cli import main
from ragdemo.ui import ask, bench_tab, library, settings
from ragdemo.ui.knobs import KnobSet
from ragdemo.workbench import Workbench
from tests.conftest import make_settings

QUESTION = "When was the tower completed?"


@dataclass
class Case:
    kind: str  # cli | compare | settings | prepare | retriever | bench_tab
    args: tuple
    message: str  # the sentence (or its telling part) the user reads
    restored: tuple | None = None  # (method, knob, value in force) a UI handler puts back

    def __str__(self):  # readable test ids
        return f"{self.kind}:{' '.join(map(str, self.args))}"[:80]


def knob_sentence(where: str, allowed: str, got) -> str:
    return f"{where} must be {allowed} (got {got})"


WHOLE_1_50 = "a whole number from 1 to 500"
CASES = [
    # ---- the command line: --set METHOD.KNOB=VALUE, every method at and beyond its bounds, wrong types
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.k=0"),
         knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, 0)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.k=-1"),
         knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, -1)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.k=501"),
         knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, 501)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.k=abc"),
         knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, "'abc'")),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.k=2.5"),
         knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, 2.5)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.max_new_tokens=-3"),
         knob_sentence("rag.max_new_tokens (max new tokens)", "a whole number from 1 to 4096", -3)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.max_new_tokens=99999"),
         knob_sentence("rag.max_new_tokens (max new tokens)", "a whole number from 1 to 4096", 99999)),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.bits=3"),
         knob_sentence("btr.bits (bits per value)", "one of 1, 2, 4, 8, 16", 3)),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.r_p=0.9"),
         knob_sentence("btr.r_p (runtime merge share)", "a number from 0 to 0.5", 0.9)),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.r_o=-0.1"),
         knob_sentence("btr.r_o (offline merge share)", "a number from 0 to 0.5", -0.1)),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.calibrate=maybe"),
         knob_sentence("btr.calibrate", "on or off: 1/0, true/false, yes/no", "'maybe'")),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.merge_mode=sometimes"),
         knob_sentence("btr.merge_mode", "one of once, every", "'sometimes'")),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.split=40"),  # the tiny model has 4 layers
         knob_sentence("btr.split (layer split)", "a whole number from 0 to 4 for this model", 40)),
    Case("cli", ("ask", QUESTION, "--methods", "btr", "--set", "btr.split=2", "--set", "btr.r_o=0.2", "--set",
                 "btr.bits=4"), "btr.r_o (offline merging) works on 1-bit codes only"),
    Case("cli", ("ask", QUESTION, "--methods", "retro", "--set", "retro.stride=2"),
         knob_sentence("retro.stride (re-retrieval stride)", "a whole number from 4 to 512", 2)),
    Case("cli", ("ask", QUESTION, "--methods", "retro", "--set", "retro.chunk_tokens=4"),
         knob_sentence("retro.chunk_tokens (query chunk tokens)", "a whole number from 8 to 512", 4)),
    Case("cli", ("ask", QUESTION, "--methods", "lloco", "--set", "lloco.c=0"),
         knob_sentence("lloco.c (compression ratio)", "a whole number from 1 to 64", 0)),
    Case("cli", ("ask", QUESTION, "--methods", "lloco", "--set", "lloco.scorer=keynrom"),
         knob_sentence("lloco.scorer", "one of reconstruct, keynorm", "'keynrom'")),
    Case("cli", ("ask", QUESTION, "--methods", "lloco", "--set", "lloco.storage=int3"),
         knob_sentence("lloco.storage", "one of fp16, int8, k8v4, int4", "'int3'")),
    Case("cli", ("ask", QUESTION, "--methods", "cacheblend", "--set", "cacheblend.r=1.5"),
         knob_sentence("cacheblend.r (recomputed share)", "a number from 0 to 1", 1.5)),
    Case("cli", ("ask", QUESTION, "--methods", "cacheblend", "--set", "cacheblend.selection_layer=4"),
         knob_sentence("cacheblend.selection_layer (selection layer)", "a whole number from 0 to 3 for this model", 4)),
    Case("cli", ("ask", QUESTION, "--methods", "lingua", "--set", "lingua.ratio=0"),
         knob_sentence("lingua.ratio (kept share)", "a number above 0 and at most 1", 0)),
    Case("cli", ("ask", QUESTION, "--methods", "lingua", "--set", "lingua.unit=sentence"),
         knob_sentence("lingua.unit", "one of word, token", "'sentence'")),
    Case("cli", ("ask", QUESTION, "--methods", "lingua", "--set", "lingua.spread=2"),
         knob_sentence("lingua.spread", "a number from 0 to 1", 2)),
    Case("cli", ("ask", QUESTION, "--methods", "jrt", "--set", "jrt.context=everything"),
         knob_sentence("jrt.context", "one of rag, full", "'everything'")),
    Case("cli", ("ask", QUESTION, "--methods", "full_context", "--set", "full_context.max_context_tokens=-5"),
         knob_sentence("full_context.max_context_tokens (max context tokens)", "a whole number from 0 to 131072", -5)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.foo=1"), "unknown knob 'foo' for rag"),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "nope.k=1"), "unknown method 'nope'"),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--set", "rag.k"), "--set takes METHOD.KNOB=VALUE"),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--max-new-tokens", "0"),
         knob_sentence("max new tokens", "a whole number from 1 to 4096", 0)),
    Case("cli", ("ask", QUESTION, "--methods", "rag", "--max-new-tokens", "5000"),
         knob_sentence("max new tokens", "a whole number from 1 to 4096", 5000)),
    Case("cli", ("ingest", "{tmp}/none.txt", "--retriever", "binary", "--rescore", "0"),
         knob_sentence("rescore", "a whole number from 1 to 1000", 0)),
    Case("cli", ("prepare", "--methods", "lingua", "--set", "lingua.ratio=1.5"),
         knob_sentence("lingua.ratio (kept share)", "a number above 0 and at most 1", 1.5)),
    Case("cli", ("finetune", "--method", "lloco", "--set", "lloco.lora_r=0"),
         knob_sentence("lloco.lora_r (LoRA rank)", "a whole number from 1 to 256", 0)),
    # ---- bench specs: METHOD@KNOB=VALUE variants, checked before any question
    Case("cli", ("bench", "--n", "2", "--methods", "btr@bits=3", "--out", "{tmp}/bench"),
         "btr@bits=3: " + knob_sentence("btr.bits (bits per value)", "one of 1, 2, 4, 8, 16", 3)),
    Case("cli", ("bench", "--n", "2", "--methods", "rag@k=0", "--out", "{tmp}/bench"),
         "rag@k=0: " + knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, 0)),
    Case("cli", ("bench", "--n", "2", "--methods", "rag@kk=2", "--out", "{tmp}/bench"), "unknown knob 'kk' for rag"),
    Case("cli", ("bench", "--n", "2", "--methods", "lloco@c=abc", "--out", "{tmp}/bench"),
         knob_sentence("lloco.c (compression ratio)", "a whole number from 1 to 64", "'abc'")),
    Case("cli", ("bench", "--n", "2", "--methods", "cacheblend@selection_layer=9", "--out", "{tmp}/bench"),
         "for this model (got 9)"),
    # ---- the UI handlers: what a click sends, out of range or of the wrong kind
    Case("compare", ("rag", "k", 0), knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, 0), ("rag", "k", 5)),
    Case("compare", ("rag", "max_new_tokens", -3),
         knob_sentence("rag.max_new_tokens (max new tokens)", "a whole number from 1 to 4096", -3),
         ("rag", "max_new_tokens", 0)),
    Case("compare", ("rag", "max_new_tokens", 99999),
         knob_sentence("rag.max_new_tokens (max new tokens)", "a whole number from 1 to 4096", 99999),
         ("rag", "max_new_tokens", 0)),
    Case("compare", ("rag", "k", 2.5), knob_sentence("rag.k (chunks retrieved)", WHOLE_1_50, 2.5), ("rag", "k", 5)),
    Case("compare", ("lingua", "ratio", 0.0),
         knob_sentence("lingua.ratio (kept share)", "a number above 0 and at most 1", 0), ("lingua", "ratio", 0.5)),
    Case("compare", ("btr", "split", 40),
         knob_sentence("btr.split (layer split)", "a whole number from 0 to 4 for this model", 40), ("btr", "split", 18)),
    Case("compare", ("lloco", "scorer", "keynrom"), knob_sentence("lloco.scorer", "one of reconstruct, keynorm", "'keynrom'"),
         ("lloco", "scorer", "reconstruct")),
    Case("settings", (0,), knob_sentence("max new tokens", "a whole number from 1 to 4096", 0)),
    Case("settings", (99999,), knob_sentence("max new tokens", "a whole number from 1 to 4096", 99999)),
    Case("settings", (None,), knob_sentence("max new tokens", "a whole number from 1 to 4096", "nothing")),
    Case("prepare", ("lloco", "c", 0), knob_sentence("lloco.c (compression ratio)", "a whole number from 1 to 64", 0),
         ("lloco", "c", 4)),
    Case("prepare", ("cacheblend", "selection_layer", 9),
         knob_sentence("cacheblend.selection_layer (selection layer)", "a whole number from 0 to 3 for this model", 9),
         ("cacheblend", "selection_layer", 1)),
    Case("retriever", ("binary", 0), knob_sentence("rescore", "a whole number from 1 to 1000", 0)),
    Case("retriever", ("binary", 5000), knob_sentence("rescore", "a whole number from 1 to 1000", 5000)),
    Case("bench_tab", (0, 24, ""), knob_sentence("questions (n)", "a whole number of at least 1", 0)),
    Case("bench_tab", (5, -1, ""), knob_sentence("max new tokens", "a whole number from 1 to 4096", -1)),
    Case("bench_tab", (5, 24, "btr@bits=3"),
         "btr@bits=3: " + knob_sentence("btr.bits (bits per value)", "one of 1, 2, 4, 8, 16", 3)),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir, docs_dir_module):
    """A store with documents, prepared artifacts and a recorded run: what a refused input must leave alone."""
    home = tmp_path_factory.mktemp("bad-input") / "home"
    bench = Workbench(make_settings(home, tiny_model_dir, max_new_tokens=4))
    bench.create_collection("default")
    bench.ingest([(p.name, p) for p in sorted(docs_dir_module.iterdir())], "default", prepare=True)
    bench.ask(QUESTION, ["rag"], "default")
    assert stored(bench)["artifacts"] and stored(bench)["runs"]  # there is something to lose
    bench.store.close()
    return home


@pytest.fixture(scope="module")
def docs_dir_module(tmp_path_factory):
    from tests.conftest import EIFFEL, FILLER

    folder = tmp_path_factory.mktemp("docs")
    (folder / "eiffel.txt").write_text(EIFFEL * 3)
    (folder / "bananas.md").write_text("# Bananas\n\n" + FILLER * 4)
    return folder


@pytest.fixture
def bench(home, tiny_model_dir, monkeypatch):
    for name, value in {"RAGDEMO_HOME": str(home), "RAGDEMO_MODEL": str(tiny_model_dir), "RAGDEMO_DTYPE": "fp32",
                        "RAGDEMO_DEVICE": "cpu", "RAGDEMO_MAX_NEW_TOKENS": "4"}.items():
        monkeypatch.setenv(name, value)
    workbench = Workbench(make_settings(home, tiny_model_dir, max_new_tokens=4))
    yield workbench
    workbench.store.close()


def stored(bench) -> dict:
    """Every table a user's data lives in, row by row (blobs by size): equal before and after a refusal."""
    queries = {"collections": "SELECT id, name, version, retriever, rescore FROM collections",
               "documents": "SELECT id, collection_id, sha256, name FROM documents",
               "chunks": "SELECT id, doc_id, ord FROM chunks", "vectors": "SELECT chunk_id, embedder FROM vectors",
               "artifacts": "SELECT method, model, params_hash, key, nbytes, created FROM artifacts",
               "runs": "SELECT id, method, question FROM runs"}
    return {table: sorted(tuple(r.values()) for r in bench.store.rows(sql)) for table, sql in queries.items()}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_refused_once_with_nothing_stored_changed(case, bench, tmp_path):
    assert len(CASES) >= 30
    before = stored(bench)
    if case.kind == "cli":
        run_cli(case, tmp_path)
    elif case.kind == "compare":
        run_compare(case, bench)
    elif case.kind == "settings":
        run_settings(case, bench)
    elif case.kind == "prepare":
        run_prepare(case, bench)
    elif case.kind == "retriever":
        run_retriever(case, bench)
    else:
        run_bench_tab(case, bench)
    assert stored(bench) == before


def run_cli(case: Case, tmp_path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([a.replace("{tmp}", str(tmp_path)) for a in case.args])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert status == 2, err.getvalue()[-2000:]
    assert len(lines) == 1 and case.message in lines[0], err.getvalue()[-2000:]
    assert "Traceback" not in err.getvalue()


def knob_values(knobs: KnobSet, method: str, name: str, value) -> list:
    values = [k.in_force for k in knobs.knobs]
    values[index_of(knobs, method, name)] = value
    return values


def index_of(knobs: KnobSet, method: str, name: str) -> int:
    return next(i for i, k in enumerate(knobs.knobs) if (k.method, k.name) == (method, name))


def assert_restored(case: Case, knobs: KnobSet, updates: list) -> None:
    """The refused knob's widget shows the value in force again; every other widget is left as it is."""
    method, name, in_force = case.restored
    i = index_of(knobs, method, name)
    assert updates[i] == gr.update(value=in_force)
    assert all(u == gr.skip() for j, u in enumerate(updates) if j != i)


def run_compare(case: Case, bench) -> None:
    knobs = built_knobs()
    method, name, value = case.args
    with pytest.warns(UserWarning, match=None) as warned:
        steps = list(ask.compare(bench, knobs, QUESTION, [method], "default", "", *knob_values(knobs, method, name, value)))
    assert any(case.message in unescape(str(w.message)) for w in warned)
    (cards, chart, sees, sources, history, status, *updates), = steps  # refused before any method ran
    assert f"Not run: {case.message}" in unescape(cards) and chart is None
    assert case.message in unescape(status)  # next to the Compare button
    assert_restored(case, knobs, updates)


def run_settings(case: Case, bench) -> None:
    in_force = settings.current_values(bench)
    with pytest.warns(UserWarning, match=None) as warned:
        status, *widgets = settings.apply(bench, bench.settings.model_id, "cpu", "none", case.args[0])
    assert any(case.message in unescape(str(w.message)) for w in warned)
    assert "Not applied" in status and case.message in unescape(status)
    assert tuple(widgets) == in_force and bench.settings.max_new_tokens == 4  # the values in force, shown again


def run_prepare(case: Case, bench) -> None:
    knobs = built_knobs()
    method, name, value = case.args
    values = knob_values(knobs, method, name, value)
    with pytest.warns(UserWarning, match=None) as warned:
        status, *updates = library.knob_job(knobs, lambda: library.prepare(bench, knobs, [method], "default", *values))
    assert any(case.message in unescape(str(w.message)) for w in warned)
    assert status.startswith("**Not done:**") and case.message in unescape(status)
    assert_restored(case, knobs, updates)


def run_retriever(case: Case, bench) -> None:
    with pytest.warns(UserWarning, match=None) as warned:
        status = library.set_retrieval(bench, "default", *case.args)
    assert any(case.message in unescape(str(w.message)) for w in warned)
    assert status.startswith("**Not done:**") and case.message in unescape(status)


def run_bench_tab(case: Case, bench) -> None:
    n, max_new, variants = case.args
    with pytest.warns(UserWarning, match=None) as warned:
        header, *rest = bench_tab.run_from_ui(bench, "squad", None, n, 0, ["rag"], variants, "rag", "", "", max_new)
    assert any(case.message in unescape(str(w.message)) for w in warned)
    assert header.startswith("**Not run:**") and case.message in unescape(header)
    assert all(r == gr.skip() for r in rest)  # the previous results stay on the page


_KNOBS: list[KnobSet] = []


def built_knobs() -> KnobSet:
    if not _KNOBS:
        with gr.Blocks():
            knobs = KnobSet()
            knobs.build()
        _KNOBS.append(knobs)
    return _KNOBS[0]
