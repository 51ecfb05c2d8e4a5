"""The one results suite: its quick mode produces every table a screen quotes (cards, Methods tab, README,
docs/RESULTS.md), stamped; and the bundled suite is what the README and docs/RESULTS.md show, regenerated, not
hand-copied."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ragdemo.bench.suite import QUICK, SECTIONS, SUITE_DIR, default_row, run_suite
from ragdemo.cards import (card_markdown, card_text, headline, load_suite, measured_section, scaling_figure,
                           where_each_method_wins, win_sentences)
from ragdemo.cards.docs import README, RESULTS_PAGE, default_headline, readme_text, results_page
from ragdemo.methods import registry

ROOT = Path(__file__).resolve().parents[1]
# the quick suite on the 4-layer test model: BTR's splits are scaled to it, everything else runs as in the full suite
TINY_PLAN = dataclasses.replace(QUICK, questions=2, overrides={"btr": {"split": 2}})


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory, tiny_model_dir):
    from tests.conftest import make_settings

    out = tmp_path_factory.mktemp("suite") / "suite"
    settings = make_settings(tmp_path_factory.mktemp("home") / "home", tiny_model_dir, max_new_tokens=4)
    record = run_suite(settings, out, quick=True, command="python -m ragdemo results --quick", plan=TINY_PLAN)
    return out, record


def test_the_quick_suite_is_stamped_with_where_and_when_it_ran(quick_suite):
    out, record = quick_suite
    stamp = json.loads((out / "suite.json").read_text())
    assert stamp == record
    for key in ("cpu", "cpu_flags", "cores", "dtype", "load_start", "load_end", "date", "commit", "wall_s", "command"):
        assert key in stamp, key
    assert stamp["quick"] is True and set(stamp["sections"]) == {s.name for s in SECTIONS}
    for info in stamp["sections"].values():
        assert info["files"] and all((out / f).is_file() for f in info["files"])


def test_every_quoted_table_is_produced(quick_suite):
    """Each card's measured section, each Methods-tab headline and the README's headline row exist for every
    registered method, read from the suite alone."""
    out, _ = quick_suite
    suite = load_suite(out)
    names = list(registry())
    table = default_headline(suite)
    for name in names:
        section = measured_section(name, suite)
        assert f"| `{default_row(name)}` |" in section, name
        assert "not measured" not in section and "not in this suite" not in section, name
        assert "QUICK MODE" in section  # a quick run never passes for the real one
        assert "not in this suite" not in headline(name, suite) and "not measured" not in headline(name, suite)
        assert f"| {registry()[name].label} |" in table
        assert card_markdown(name, suite).startswith(card_text(name).strip()[:20])
    for name, marker in (("btr", "Storage, every byte counted"), ("btr", "Where the time goes"),
                         ("lloco", "Where the time goes"), ("lingua", "The same rows on other questions"),
                         ("retro", "re-retrieved"), ("jrt", "RAG's prompt tokens"),
                         ("rag", "rag@join=1"), ("btr", "Second attempt")):
        assert marker in measured_section(name, suite), (name, marker)
    page = results_page(suite)
    for heading in [s.title for s in SECTIONS]:
        assert f"## {heading}" in page


def test_the_quick_suite_shows_where_each_method_wins(quick_suite):
    """bench-scaling's section: both ladders at every planned size, each method's TTFT parts, token-layers,
    bytes read, value kept and (for the reuse methods) its ceiling and share, the plot, one sentence per method,
    and the table on the Methods tab's section and docs/RESULTS.md."""
    out, _ = quick_suite
    suite = load_suite(out)
    record = suite.data("scaling")
    plan = TINY_PLAN.scaling
    sizes = [(r["ladder"], r["size"]) for r in record["rungs"]]
    assert sizes == [("retrieved", k) for k in plan.ks] + [("document", n) for n in plan.documents]
    for rung in record["rungs"]:
        by_method = {m["method"]: m for m in rung["methods"]}
        assert set(by_method) == {"rag", "lloco", "cacheblend", "btr"}
        assert by_method["btr"]["knobs"]["split"] == 2 and all(m["knobs"]["k"] == rung["k"] for m in rung["methods"])
        for m in rung["methods"]:
            assert m["ms"]["ttft"] > 0 and m["processed_tokens"] + m["cached_tokens"] == pytest.approx(m["prompt_tokens"], abs=0.1)
            assert set(m["value_kept"]) == {"value", "low", "high"}
            assert ("ceiling" in m) == (m["method"] != "rag")
        assert by_method["lloco"]["bytes_read"] > 0 and by_method["rag"]["bytes_read"] == 0
        if rung["ladder"] == "document":  # every chunk of the document is read: RAG is full context, in chunks
            assert rung["k"] == rung["chunks"] and by_method["rag"]["prompt_tokens"] > rung["size"]
    assert scaling_figure(suite) == out / "scaling" / "scaling.png"
    sentences = win_sentences(suite)
    assert [s.split("`")[1] for s in sentences] == ["lloco", "cacheblend", "btr"]
    text = where_each_method_wins(suite)
    assert "QUICK MODE" in text and "| `lloco` |" in text and "Ceiling" in text
    assert all(sentence in text for sentence in sentences)
    page = results_page(suite)
    assert text in page and "](scaling/scaling.png)" in page


def test_speed_is_said_one_way_everywhere_the_suite_is_quoted(quick_suite):
    """'x faster / slower than RAG', never a bare ratio such as '0.20x'."""
    out, _ = quick_suite
    suite = load_suite(out)
    texts = [results_page(suite)] + [card_markdown(n, suite) for n in registry()] + [headline(n, suite) for n in registry()]
    for text in texts:
        assert not re.search(r"\b0\.\d+x\b", text), re.search(r".{40}\b0\.\d+x\b.{20}", text)
    assert "faster than RAG" in texts[0] or "slower than RAG" in texts[0]


def test_readme_blocks_are_generated_and_a_failed_run_keeps_the_previous_suite(quick_suite, tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    import ragdemo.bench.suite as suite_module
    from tests.conftest import make_settings

    out, _ = quick_suite
    suite = load_suite(out)
    template = "intro\n<!-- suite:headline -->\nSTALE-TABLE\n<!-- /suite:headline -->\nmid\n<!-- glossary -->\nx\n<!-- /glossary -->\n"
    text = readme_text(template, suite)
    assert default_headline(suite) in text and "STALE-TABLE" not in text and text.startswith("intro\n")
    previous = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def written(settings, folder, plan, progress):
        folder.mkdir(parents=True)
        (folder / "part.json").write_text("{}")
        return [folder / "part.json"]

    def broken(settings, folder, plan, progress):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(suite_module, "SECTIONS", [suite_module.Section("a", "A", written),
                                                   suite_module.Section("b", "B", broken)])
    with pytest.raises(RuntimeError):
        run_suite(make_settings(tmp_path / "home", tiny_model_dir), out, quick=True, plan=TINY_PLAN)
    now = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert now == previous  # a suite is replaced whole or not at all: never half old, half new


def test_methods_tab_shows_the_suites_headlines_and_plots(quick_suite, monkeypatch):
    import gradio as gr

    import ragdemo.cards.suite as suite_module
    from ragdemo.ui.methods_tab import build_methods_tab, method_summary

    out, _ = quick_suite
    monkeypatch.setattr(suite_module, "SUITE_DIR", out)
    assert headline("rag") in method_summary("rag", registry()["rag"])
    with gr.Blocks() as demo:
        build_methods_tab()
    images = [c for c in demo.config["components"] if c.get("type") == "image"]
    assert images and all(str(out.name) in c["props"]["label"] for c in images)
    assert any(c["props"]["label"].endswith("scaling/scaling.png") for c in images)
    texts = [c["props"].get("value") or "" for c in demo.config["components"] if c.get("type") == "markdown"]
    assert any(where_each_method_wins(load_suite(out)) in t for t in texts)


def test_the_bundled_suite_is_what_the_readme_and_results_page_show():
    """The README's headline and glossary blocks and docs/RESULTS.md are exactly what `python -m ragdemo results`
    writes from the bundled suite: nothing on them was copied or edited by hand, and no other run is quoted."""
    suite = load_suite(SUITE_DIR)
    assert suite is not None, "run `python -m ragdemo results` to bundle the suite"
    assert not suite.stamp.get("quick"), "the bundled suite must be a full run"
    assert README.read_text() == readme_text(README.read_text(), suite)
    assert RESULTS_PAGE.read_text() == results_page(suite)
    results = ROOT / "assets" / "results"
    assert sorted(p.name for p in results.iterdir()) == ["suite"], "runs the suite replaced stay in git history only"
