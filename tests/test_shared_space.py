"""A class on one shared app (RAGDEMO_SHARED=1): nothing a visitor does trains an adapter or prepares a whole
collection inside an answer, Settings cannot be switched, long jobs stop at their deadline, and one Compare has
one deadline across all its methods."""
from __future__ import annotations

import pytest

from ragdemo import cli
from ragdemo.deadline import Deadline
from ragdemo.errors import UserError
from ragdemo.workbench import Workbench

from .conftest import make_settings

BTR_ON_TINY = {"split": 2}  # the tiny test model has 4 layers; BTR's default split is deeper


def _shared_bench(tmp_path, tiny_model_dir, docs_dir, monkeypatch, **extra) -> Workbench:
    monkeypatch.setenv("RAGDEMO_SHARED", "1")
    bench = Workbench(make_settings(tmp_path / "home", tiny_model_dir, max_new_tokens=4, **extra))
    bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    return bench


def _artifacts(bench: Workbench, method: str) -> int:
    return int(bench.store.value("SELECT COUNT(*) FROM artifacts WHERE method = ?", (method,)))


def test_shared_cli_refuses_a_training_knob_in_one_line_and_trains_nothing(tmp_path, tiny_model_dir, docs_dir,
                                                                           monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("RAGDEMO_HOME", str(home))
    monkeypatch.setenv("RAGDEMO_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("RAGDEMO_DTYPE", "fp32")
    assert cli.main(["ingest", *map(str, sorted(docs_dir.iterdir())), "--collection", "class", "--no-prepare"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("RAGDEMO_SHARED", "1")
    code = cli.main(["ask", "Who built the tower?", "--collection", "class", "--methods", "rag,btr",
                     "--set", "btr.train=1", "--set", "btr.split=2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "btr.train=1" in errors[0] and "Prepare" in errors[0] and "RAGDEMO_SHARED" in errors[0]
    bench = Workbench(make_settings(home, tiny_model_dir))
    assert _artifacts(bench, "btr") == 0 and bench.runs("class") == []  # nothing trained, nothing answered


def test_shared_answer_never_prepares_a_whole_collection(tmp_path, tiny_model_dir, docs_dir, monkeypatch):
    bench = _shared_bench(tmp_path, tiny_model_dir, docs_dir, monkeypatch)
    with pytest.raises(UserError, match="run Prepare in the Library"):
        bench.ask("Who built the tower?", ["btr"], "class", {"btr": BTR_ON_TINY})
    assert _artifacts(bench, "btr") == 0
    # per retrieved chunk (a few, bounded) is still built on first use, as on a private app
    (lloco,) = bench.ask("Who built the tower?", ["lloco"], "class")
    assert not lloco.error and _artifacts(bench, "lloco") > 0
    # once Prepare has built BTR at these knobs, the same answer works
    bench.prepare(["btr"], "class", {"btr": BTR_ON_TINY})
    (btr,) = bench.ask("Who built the tower?", ["btr"], "class", {"btr": BTR_ON_TINY})
    assert not btr.error and btr.answer is not None and btr.prepare_s == 0


def test_shared_prepare_refuses_training_and_stops_at_its_deadline(tmp_path, tiny_model_dir, docs_dir, monkeypatch):
    bench = _shared_bench(tmp_path, tiny_model_dir, docs_dir, monkeypatch)
    assert bench.settings.max_job_s == 300  # a shared app gets a limit by default
    with pytest.raises(UserError, match="lloco.train=1"):
        bench.prepare(["lloco"], "class", {"lloco": {"train": 1}})
    assert _artifacts(bench, "lloco") == 0
    with pytest.raises(UserError, match="stopped at its 1e-09 s limit"):
        bench.prepare(["lloco"], "class", None, deadline=Deadline.after(1e-9, "a test"))
    # what finished before the stop is kept; the next Prepare continues and completes
    (line,) = bench.prepare(["lloco"], "class")
    assert line.startswith("lloco: prepared")


def test_settings_are_read_only_for_visitors_of_a_shared_app(tmp_path, tiny_model_dir, docs_dir, monkeypatch):
    from ragdemo.ui import build_app, settings

    bench = _shared_bench(tmp_path, tiny_model_dir, docs_dir, monkeypatch)
    with pytest.raises(UserError, match="read-only"):
        bench.use_settings(bench.settings.with_(max_new_tokens=4096))
    with pytest.warns(UserWarning, match="read-only"):
        status, *widgets = settings.apply(bench, "HuggingFaceTB/SmolLM2-360M-Instruct", "cpu", "none", 4096)
    assert status.startswith("**Not applied:**") and widgets[-1] == 4 and bench.settings.max_new_tokens == 4
    config = build_app(bench).get_config_file()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c.get("props", {}).get("elem_id")}
    assert by_id["settings-apply"]["visible"] is False and "RAGDEMO_MODEL" in by_id["settings-note"]["value"]


def test_one_deadline_spans_every_method_of_a_compare(tiny_settings, docs_dir):
    """A deadline already spent when the Compare starts: no method runs, and each card says why, once."""
    bench = Workbench(tiny_settings)
    bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    results = bench.compare("Who built the tower?", ["closed_book", "rag", "full_context"], "class",
                            deadline=Deadline.after(1e-9, "RAGDEMO_MAX_COMPARE_S"))
    assert all(r.error.startswith("not run") and "RAGDEMO_MAX_COMPARE_S" in r.error for r in results)
    assert bench.runs("class") == []


def test_three_model_switches_leave_one_model_and_its_caches_in_memory(tmp_path, tiny_model_dir, docs_dir):
    """Each switch loads the new model first (a failure keeps the old one), then lets the previous model and
    every cache kept on it go; afterwards only the model in use is alive."""
    import gc
    import weakref

    from ragdemo.engine.prefix import prefix_cache

    bench = Workbench(make_settings(tmp_path / "home", tiny_model_dir, max_new_tokens=4))
    bench.ingest([(p.name, p) for p in sorted(docs_dir.iterdir())], "class", prepare=False)
    alive = []
    for dtype, attention in (("fp32", "auto"), ("bf16", "auto"), ("fp32", "sdpa"), ("bf16", "sdpa")):
        if bench.settings.dtype != dtype or bench.settings.attention != attention:
            bench.use_settings(bench.settings.with_(dtype=dtype, attention=attention))
        (result,) = bench.ask("Who built the tower?", ["rag"], "class")  # fills the model's caches
        assert not result.error
        lm = bench.models.lm
        alive.append((weakref.ref(lm), weakref.ref(prefix_cache(lm))))
        del lm
    gc.collect()
    live = [i for i, (lm, cache) in enumerate(alive) if lm() is not None or cache() is not None]
    assert live == [3], f"models still in memory after three switches: {live}"
