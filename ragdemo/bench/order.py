"""`python -m ragdemo bench-order`: does a method's TTFT depend on where it runs in a comparison?

The same questions are asked with the same methods in one order and in the reverse order. Every question runs
in a fresh process (`python -m ragdemo ask ... --json`), so each answer is the first of its process: the
strongest test that warm-up, not position, absorbs the one-time costs.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .scratch import scratch_workbench

TARGET = 1.3


def rotated(items: list, index: int) -> list:
    """The methods (or rows) for question `index`, starting at item `index` (mod their number), so no method always
    runs first after a question change: the first answer to a new question retrieves ~3 ms slower than the rest
    on the Intel AMX machine (11.5 against 8.6 ms median: its rows and the embedder's weights are cold), so a
    fixed order would charge that to RAG alone and flatter every ratio. The bench runner and bench-speed use it."""
    start = index % len(items) if items else 0
    return items[start:] + items[:start]


@dataclass
class OrderRow:
    method: str
    forward_position: int
    reverse_position: int
    forward_ttft_s: float  # median over the questions
    reverse_ttft_s: float

    @property
    def ratio(self) -> float:
        """Median TTFT at the earlier position over the median at the later one (1 = no position effect)."""
        early, late = ((self.forward_ttft_s, self.reverse_ttft_s) if self.forward_position <= self.reverse_position
                       else (self.reverse_ttft_s, self.forward_ttft_s))
        return early / late if late > 0 else float("inf")

    @property
    def meets_target(self) -> bool:
        return 1 / TARGET <= self.ratio <= TARGET


def run_order_bench(settings, methods: list[str], questions: list[str], documents: list[tuple[str, str]],
                    progress=None) -> list[OrderRow]:
    """Ingest `documents` (artifacts prepared at ingest) into a throwaway store, then ask each question in a
    fresh process, methods in order and in reverse. Leaves nothing behind."""
    with scratch_workbench(settings, "order") as bench:
        home = bench.settings.home
        reports = bench.ingest([(n, t.encode()) for n, t in documents], "order", _part(progress, 0, 0.3), prepare=True)
        if any(r.status == "error" for r in reports):
            raise UserError(f"could not ingest the documents: {[r.message for r in reports if r.status == 'error'][0]}")
        bench.store.close()  # the fresh processes below open it themselves
        runs = {}
        for k, order in enumerate((list(methods), list(reversed(methods)))):
            ttfts = {m: [] for m in methods}
            for i, question in enumerate(questions):
                if progress:
                    progress(0.3 + 0.7 * (k * len(questions) + i) / (2 * len(questions)),
                             f"{'forward' if k == 0 else 'reverse'} order, question {i + 1}/{len(questions)}")
                for result in _ask_fresh(settings, home, question, order):
                    if result.get("error"):
                        raise UserError(f"{result['method']} failed: {result['error']}")
                    ttfts[result["method"]].append(result["ttft_s"])
            runs[k] = {m: statistics.median(v) for m, v in ttfts.items()}
    n = len(methods)
    return [OrderRow(m, i, n - 1 - i, runs[0][m], runs[1][m]) for i, m in enumerate(methods)]


def _part(progress, start: float, share: float):
    return (lambda f, m: progress(start + share * f, m)) if progress else None


def _ask_fresh(settings, home: Path, question: str, methods: list[str]) -> list[dict]:
    env = {**os.environ, "RAGDEMO_HOME": str(home), "RAGDEMO_MODEL": settings.model_id,
           "RAGDEMO_DTYPE": settings.dtype, "RAGDEMO_DEVICE": settings.device, "RAGDEMO_ATTENTION": settings.attention,
           "RAGDEMO_MAX_NEW_TOKENS": str(settings.max_new_tokens)}
    command = [sys.executable, "-m", "ragdemo", "ask", question, "--collection", "order", "--methods",
               ",".join(methods), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise UserError(f"ask failed in a fresh process: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def write_order(rows: list[OrderRow], out: Path, meta: dict) -> list[Path]:
    """results file + table, so the README quotes a file rather than numbers copied by hand."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "order.json"
    data.write_text(json.dumps({"meta": meta, "rows": [{**vars(r), "ratio": r.ratio} for r in rows]}, indent=1))
    table = out / "order_summary.md"
    table.write_text(format_rows(rows) + "\n")
    return [data, table]


def format_rows(rows: list[OrderRow]) -> str:
    lines = ["| method | position fwd / rev | median TTFT fwd s | median TTFT rev s | earlier / later | <= 1.3 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.forward_position + 1} / {r.reverse_position + 1} | {r.forward_ttft_s:.3f} | "
                     f"{r.reverse_ttft_s:.3f} | {r.ratio:.2f} | {'yes' if r.meets_target else 'NO'} |")
    return "\n".join(lines)
