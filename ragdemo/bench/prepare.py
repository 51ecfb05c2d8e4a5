"""`python -m ragdemo bench-prepare`: upload-to-ready speed, per method and for every method together, against
one plain prefill over the same tokens in the same run.

In a throwaway store: the documents are ingested once (read, chunk, embed, store: timed), then each method is
prepared alone and all of them together, each from nothing (no artifact, no state kept in memory), after a
warm-up preparation on a small collection. Upload-to-ready = ingest + that preparation, over the collection's
tokens. The plain prefill reads the same chunk tokens (as the pass reads them) through the model's own forward in
windows of `PREFILL_WINDOW` tokens, last-position logits only: the cheapest reading of every token once, timed
before and after the preparations (the best of the two). Ratios, not times, are what compare across machines.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..engine.prompt import passage_ids
from ..engine.warmup import warm_model
from ..methods import get_method, registry
from ..methods.base import params_from
from ..methods.preparation import PassReport, prepare_methods
from .datasets import load_squad
from .scratch import scratch_workbench
from .storage import write_rows

PREFILL_WINDOW = 1024  # tokens per plain prefill call
QUICK_CHARS = 3000  # --quick: the first article cut to this many characters
WARM_CHARS = 1500  # the warm-up collection: the first article's opening


@dataclass
class PrepareRow:
    label: str
    tokens: int  # the collection's tokens
    seconds: float  # upload-to-ready: ingest + preparation (the prefill row: the prefill alone)
    prepare_s: float  # the preparation alone
    tokens_per_s: float  # tokens / seconds
    vs_prefill: float  # seconds / the plain prefill's seconds
    forward_s: float = 0.0  # inside the shared forward
    take_s: float = 0.0  # turning batches into artifacts
    write_s: float = 0.0
    finish_s: float = 0.0  # after the forward: BTR's fit and binarizing, each method's remaining steps


def run_prepare_bench(settings, path: str | None = None, articles: int = 3, seed: int = 0,
                      methods: list[str] | None = None, knobs: dict | None = None, quick: bool = False,
                      progress=None) -> tuple[list[PrepareRow], dict]:
    say = progress or (lambda fraction, message: None)
    names = methods or [name for name, method in registry().items() if method.has_prepare]
    documents = load_squad(path, articles=1 if quick else articles, seed=seed).haystacks[0].documents
    if quick:
        documents = [(name, text[:QUICK_CHARS]) for name, text in documents[:1]]
    with scratch_workbench(settings, "prepare") as bench:
        lm = bench.models.lm
        say(0.0, "warming up: the model, the embedder and one small preparation of every method")
        warm_model(lm)
        bench.ingest([(documents[0][0], documents[0][1][:WARM_CHARS].encode())], "warm-up", prepare=False)
        _prepare(bench, "warm-up", names, knobs)
        say(0.1, f"ingesting {len(documents)} documents")
        started = time.perf_counter()
        bench.ingest([(name, text.encode()) for name, text in documents], "bench", prepare=False)
        ingest_s = time.perf_counter() - started
        corpus = bench.corpus("bench")
        tokens = corpus.n_tokens()
        chunk_ids = [i for c in corpus.chunks() for i in passage_ids(lm.tokenizer, c["text"])]
        prefill_s = plain_prefill_s(lm, chunk_ids)
        timed: list[tuple[str, float, PassReport]] = []
        for i, group in enumerate([[name] for name in names] + [names]):
            label = "all together" if len(group) > 1 else group[0]
            say(0.2 + 0.7 * i / (len(names) + 1), f"preparing {label}")
            _forget(bench, lm)
            started = time.perf_counter()
            report = _prepare(bench, "bench", group, knobs)
            timed.append((label, time.perf_counter() - started, report))
        say(0.95, "the plain prefill again")
        prefill_s = min(prefill_s, plain_prefill_s(lm, chunk_ids))
        rows = [PrepareRow("plain prefill", tokens, prefill_s, 0.0, tokens / prefill_s, 1.0),
                PrepareRow("ingest alone (read, chunk, embed, store)", tokens, ingest_s, 0.0, tokens / ingest_s,
                           ingest_s / prefill_s)]
        for label, seconds, report in timed:
            total = ingest_s + seconds
            rows.append(PrepareRow(label, tokens, total, seconds, tokens / total, total / prefill_s, report.forward_s,
                                   report.take_s, report.write_s, report.finish_s))
        meta = {"model": lm.model_id, "dtype": str(lm.dtype).replace("torch.", ""), "documents": [n for n, _ in documents],
                "tokens": tokens, "chunk_tokens": len(chunk_ids), "prefill_window": PREFILL_WINDOW,
                "methods": names, "knobs": knobs or {}, "quick": quick,
                "load_before_after": [round(x, 2) for x in os.getloadavg()],
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    say(1.0, "done")
    return rows, meta


def _prepare(bench, collection: str, names: list[str], knobs: dict | None) -> PassReport:
    """What Workbench.prepare does, keeping the pass's report (where its seconds went)."""
    corpus = bench.corpus(collection)
    items = [(n, get_method(n), params_from(get_method(n).Params, (knobs or {}).get(n))) for n in names]
    _, report = prepare_methods(corpus, items, skip_unsupported=True)
    return report


def _forget(bench, lm) -> None:
    """Nothing prepared before counts: the store's artifacts and the states kept in memory go."""
    with bench.store.transaction():
        bench.store.db.execute("DELETE FROM artifacts")
    lm.__dict__.get("memos", {}).clear()


def plain_prefill_s(lm, ids: list[int], window: int = PREFILL_WINDOW) -> float:
    """Seconds for the model's own forward over `ids`, `window` tokens per call, last-position logits only."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            lm.model(input_ids=torch.tensor([ids[start:start + window]], device=lm.device), logits_to_keep=1)
    return time.perf_counter() - started


def prepare_markdown(rows: list[PrepareRow]) -> str:
    lines = ["| what | tokens | upload-to-ready s | preparation s | tokens/s | x plain prefill time | forward s | "
             "artifacts s | writes s | after the forward s |", "|---|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r.label} | {r.tokens:,} | {r.seconds:.1f} | {r.prepare_s:.1f} | {r.tokens_per_s:,.0f} | "
                     f"{r.vs_prefill:.2f} | {r.forward_s:.1f} | {r.take_s:.1f} | {r.write_s:.1f} | {r.finish_s:.1f} |")
    return "\n".join(lines)


def write_prepare(rows: list[PrepareRow], out: Path, meta: dict) -> list[Path]:
    return write_rows(out, "prepare", rows, meta, prepare_markdown(rows))
