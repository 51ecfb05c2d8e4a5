"""bench-order (does TTFT depend on a method's position?) and bench-storage (one storage account)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ragdemo.bench.order import OrderRow


def test_order_ratio_is_earlier_position_over_later_position():
    first_in_forward = OrderRow("rag", 0, 2, forward_ttft_s=0.30, reverse_ttft_s=0.20)
    assert first_in_forward.ratio == pytest.approx(1.5) and not first_in_forward.meets_target
    last_in_forward = OrderRow("btr", 2, 0, forward_ttft_s=0.20, reverse_ttft_s=0.22)
    assert last_in_forward.ratio == pytest.approx(0.22 / 0.20) and last_in_forward.meets_target
    faster_first = OrderRow("x", 0, 1, forward_ttft_s=0.1, reverse_ttft_s=0.2)
    assert not faster_first.meets_target  # a position effect either way fails


def _env(home, model):
    return {**os.environ, "RAGDEMO_HOME": str(home), "RAGDEMO_MODEL": str(model), "RAGDEMO_DTYPE": "fp32",
            "RAGDEMO_MAX_NEW_TOKENS": "3"}


def test_bench_order_runs_fresh_processes_and_prints_a_row_per_method(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "ragdemo", "bench-order", "--methods", "closed_book,rag", "--n", "1",
                           "--articles", "1"], capture_output=True, text=True, env=_env(tmp_path / "h", tiny_model_dir),
                          timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1 = a ratio missed the target (timing on a shared CPU)
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| closed_book") or l.startswith("| rag")]
    assert len(rows) == 2 and "1 / 2" in rows[0] and "2 / 1" in rows[1]


def test_bench_storage_counts_every_part_and_writes_its_table(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ragdemo", "bench-storage", "--methods", "btr@split=2@bits=1,lloco@c=4",
                           "--min-tokens", "3000", "--out", str(out)], capture_output=True, text=True,
                          env=_env(tmp_path / "h", tiny_model_dir), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "storage.json").read_text())["rows"]
    assert {(r["collection"], r["method"]) for r in rows} == {
        (c, m) for c in ("squad-2-articles", "essays-3k") for m in ("btr@split=2@bits=1", "lloco@c=4")}
    for r in rows:
        assert r["total"] == r["chunk_bytes"] + sum(r["shared"].values())
        assert r["bytes_per_token"] == pytest.approx(r["total"] / r["tokens"], abs=0.05)  # rounded to 0.1
    btr = next(r for r in rows if r["method"].startswith("btr"))
    assert "decoder" in btr["shared"] and btr["shared"]["decoder"] > 0  # the calibration decoder is counted
    assert (out / "storage_summary.md").read_text().count("\n") == len(rows) + 2
