"""bench-prepare: upload-to-ready per method and for every method together, against one plain prefill."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ragdemo.bench.prepare import PrepareRow, prepare_markdown, run_prepare_bench
from ragdemo.methods import registry

PREPARED = sorted(name for name, method in registry().items() if method.has_prepare)


def test_quick_run_measures_every_method_alone_and_together_against_the_prefill(tiny_settings):
    rows, meta = run_prepare_bench(tiny_settings, quick=True, knobs={"btr": {"split": "2"}})
    by_label = {r.label: r for r in rows}
    assert set(by_label) == {"plain prefill", "ingest alone (read, chunk, embed, store)", "all together", *PREPARED}
    tokens = meta["tokens"]
    assert tokens > 100 and all(r.tokens == tokens for r in rows)
    ingest = by_label["ingest alone (read, chunk, embed, store)"].seconds
    for label in [*PREPARED, "all together"]:
        row = by_label[label]
        assert row.prepare_s > 0 and row.forward_s > 0, label  # each really ran the model from nothing
        assert abs(row.seconds - (ingest + row.prepare_s)) < 1e-6  # upload-to-ready = ingest + preparation
        assert abs(row.tokens_per_s - tokens / row.seconds) < 1e-6
        assert abs(row.vs_prefill - row.seconds / by_label["plain prefill"].seconds) < 1e-6
    assert meta["chunk_tokens"] >= tokens and set(meta["methods"]) == set(PREPARED)
    table = prepare_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "all together" in table


def test_cli_quick_run_writes_its_table(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    env = {**os.environ, "RAGDEMO_HOME": str(tmp_path / "h"), "RAGDEMO_MODEL": str(tiny_model_dir),
           "RAGDEMO_DTYPE": "fp32"}
    proc = subprocess.run([sys.executable, "-m", "ragdemo", "bench-prepare", "--quick", "--methods", "lloco,lingua",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "prepare.json").read_text())
    labels = [row["label"] for row in data["rows"]]
    assert labels[-3:] == ["lloco", "lingua", "all together"] and data["meta"]["quick"] is True
    assert "bench-prepare --quick" in data["meta"]["command"]
    assert (out / "prepare_summary.md").read_text().startswith("| what |")
    assert all(PrepareRow(**row).tokens_per_s > 0 for row in data["rows"])
