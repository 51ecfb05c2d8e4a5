"""Rows for the app's tables: History (past answers) and the Library's documents with their storage."""
from __future__ import annotations

import time

from ...units import fmt_bytes, fmt_s
from .shared import short


def history_rows(runs: list[dict]) -> list[list]:
    rows = []
    for run in runs:
        r = run["result"]
        rows.append([time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["created"])), run["question"], run["method"],
                     _knob_text(r.get("params")), run["model"], short(r.get("error") or r.get("answer", ""), 120),
                     r.get("prompt_tokens", 0), fmt_s(r.get("ttft_s", 0)), fmt_s(r.get("total_s", 0)),
                     fmt_bytes(r.get("storage_bytes", 0))])
    return rows


def _knob_text(params) -> str:
    """The knobs that differed from the method's defaults: "k=1, max_new_tokens=32" (wraps at the spaces)."""
    return ", ".join(f"{k}={v}" for k, v in (params or {}).items()) if isinstance(params, dict) else ""


HISTORY_HEADERS = ["time", "question", "method", "knobs", "model", "answer", "prompt tokens", "TTFT", "total", "storage read"]
# at 800 px "method", the numbers and their headers fit their columns without breaking inside a word
HISTORY_WIDTHS = ["8%", "13%", "10%", "11%", "9%", "15%", "8%", "8%", "8%", "10%"]


SHARED_ROW = "(shared by all documents)"  # the collection-level row: decoders, codebooks, adapters


def document_table(docs: list[dict], methods: list[str] = (), shared: dict[str, int] | None = None
                   ) -> tuple[list[str], list[list]]:
    """Headers and rows: one storage column per method in `methods` (those with offline artifacts) and per
    method that has cached artifacts for any document or the collection. A last row holds the collection-level
    bytes (`shared`) when there are any, so every method's column adds up to all it keeps."""
    shared = {m: b for m, b in (shared or {}).items() if b}
    methods = list(methods) + sorted(({m for d in docs for m in d.get("storage", {})} | set(shared)) - set(methods))
    headers = ["id", "name", "tokens", "chunks", "size"] + [f"{m} storage" for m in methods]
    rows = [[d["id"], d["name"], d["n_tokens"], d["n_chunks"], fmt_bytes(d["size"])]
            + [fmt_bytes(d.get("storage", {}).get(m, 0)) for m in methods] for d in docs]
    if docs and shared:
        rows.append(["", SHARED_ROW, "", "", ""] + [fmt_bytes(shared.get(m, 0)) for m in methods])
    return headers, rows
