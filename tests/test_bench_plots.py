"""The frontier plot: value kept against speed-up over the reference, from a run's summary rows."""
from types import SimpleNamespace

from ragdemo.bench.plots import pareto_front, plot_speedup, short_labels


def _run(rows):
    return SimpleNamespace(meta={"reference": "rag", "dataset": "squad"}, summary=rows)


def test_short_labels_drop_the_shared_method_name_only():
    assert short_labels(["btr@split=18@lora=0", "btr"]) == ["split=18 lora=0", "btr"]
    assert short_labels(["btr@split=18", "lloco@c=4"]) == ["btr@split=18", "lloco@c=4"]


def test_speedup_front_keeps_points_no_other_beats_on_both_axes():
    speedup_value = [(2.0, 90.0), (1.5, 95.0), (1.2, 80.0), (3.0, 50.0)]
    front = pareto_front([(-x, y) for x, y in speedup_value])
    assert sorted(front) == [0, 1, 3]  # (1.2, 80) is slower and worse than (1.5, 95)


def test_plot_speedup_needs_two_variants_and_writes_a_png(tmp_path):
    rag = {"method": "rag", "ttft_vs_ref": 1.0, "value_kept": 1.0}
    one = {"method": "btr@split=18", "ttft_vs_ref": 0.5, "value_kept": 0.9}
    assert plot_speedup(_run([rag, one]), tmp_path / "a.png") is None
    closed = {"method": "closed_book", "ttft_vs_ref": None, "value_kept": 0.0}  # NLL-only rows have no TTFT
    two = {"method": "btr@split=24", "ttft_vs_ref": 0.3, "value_kept": float("nan")}
    assert plot_speedup(_run([rag, one, closed, two]), tmp_path / "b.png") is None
    three = {"method": "btr@split=6", "ttft_vs_ref": 0.8, "value_kept": 0.97}
    path = plot_speedup(_run([rag, one, closed, three]), tmp_path / "c.png")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_bench_frontier_cli_plots_one_methods_rows_over_runs(tmp_path, monkeypatch, capsys):
    import json

    from ragdemo.cli import main

    def write(folder, rows):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"meta": {"reference": "rag", "dataset": "squad"},
                                                         "summary": rows}))
    rag = {"method": "rag", "ttft_vs_ref": 1.0, "value_kept": 1.0}
    write(tmp_path / "a", [rag, {"method": "btr@split=18", "ttft_vs_ref": 0.5, "value_kept": 0.9}])
    write(tmp_path / "b", [rag, {"method": "btr@split=24", "ttft_vs_ref": 0.4, "value_kept": 0.7},
                           {"method": "lloco", "ttft_vs_ref": 0.2, "value_kept": 0.9}])
    out = tmp_path / "frontier.png"
    monkeypatch.setenv("RAGDEMO_HOME", str(tmp_path / "home"))  # the CLI opens a workbench; keep it out of ~
    assert main(["bench-frontier", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out
    assert main(["bench-frontier", str(tmp_path / "a"), "--out", str(out)]) == 2  # one btr row: no frontier
    assert main(["bench-frontier", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no bench results" in capsys.readouterr().err


