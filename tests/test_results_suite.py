"""The one results suite: its quick mode produces every table a screen quotes (cards, Methods tab, README,
docs/RESULTS.md), stamped; and the bundled suite is what the README and docs/RESULTS.md show, regenerated, not
hand-copied."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from ragdemo.bench.suite import QUICK, SECTIONS, SUITE_DIR, run_suite
from ragdemo.cards import card_markdown, headline, load_suite, measured_section
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
        assert f"| `{name}` |" in section and "not measured" not in section and "not in this suite" not in section, name
        assert "QUICK MODE" in section  # a quick run never passes for the real one
        assert "not in this suite" not in headline(name, suite) and "not measured" not in headline(name, suite)
        assert f"| {registry()[name].label} |" in table
        assert card_markdown(name, suite).startswith(registry()[name].card.strip()[:20])
    for name, marker in (("btr", "Storage, every byte counted"), ("btr", "Where the time goes"),
                         ("lloco", "Where the time goes"), ("lingua", "Confirmed on other questions"),
                         ("retro", "re-retrieved"), ("jrt", "RAG's prompt tokens"),
                         ("rag", "rag@join=1")):
        assert marker in measured_section(name, suite), (name, marker)
    page = results_page(suite)
    for heading in [s.title for s in SECTIONS]:
        assert f"## {heading}" in page


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
    template = "intro\n<!-- suite:headline -->\nold\n<!-- /suite:headline -->\nmid\n<!-- glossary -->\nx\n<!-- /glossary -->\n"
    text = readme_text(template, suite)
    assert default_headline(suite) in text and "old" not in text and text.startswith("intro\n")
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
