"""`python -m ragdemo bench-storage`: every byte each method keeps for a collection, counted one way.

Builds throwaway collections (the 2-article SQuAD sample and a larger one of essays), prepares each method at
the given knobs, and reports its `StorageAccount` against an fp16 KV cache of the same tokens.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine.binary import fp16_kv_bytes_per_token
from ..errors import UserError
from ..units import fmt_bytes
from .datasets import ESSAYS, load_squad
from .scratch import scratch_workbench

DEFAULT_SPECS = "btr@bits=1,lloco@c=4"


@dataclass
class StorageRow:
    collection: str
    method: str
    tokens: int
    chunk_bytes: int
    shared: dict
    total: int
    bytes_per_token: float  # everything / collection tokens
    chunk_bytes_per_token: float  # per-chunk artifacts only / collection tokens
    fp16_kv_bytes_per_token: int

    @property
    def smaller_than_kv(self) -> float:
        return self.fp16_kv_bytes_per_token / self.bytes_per_token if self.bytes_per_token else float("inf")


def essay_documents(min_tokens: int, tokenizer) -> list[tuple[str, str]]:
    """Essays in name order until the collection holds at least `min_tokens` tokens."""
    docs, tokens = [], 0
    for path in sorted(ESSAYS.glob("*.txt")):
        if tokens >= min_tokens:
            break
        text = path.read_text(encoding="utf-8")
        docs.append((path.name, text))
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokens < min_tokens:
        raise UserError(f"the bundled essays hold only {tokens} tokens, fewer than {min_tokens}")
    return docs


def run_storage_bench(settings, specs_text: str = DEFAULT_SPECS, min_tokens: int = 50_000,
                      progress=None, articles: int = 2) -> list[StorageRow]:
    from .specs import parse_method_specs

    specs = parse_method_specs(specs_text)
    with scratch_workbench(settings, "storage") as bench:
        lm = bench.models.lm
        collections = {f"squad-{articles}-article{'s' if articles > 1 else ''}":
                       load_squad(articles=articles).haystacks[0].documents,
                       f"essays-{min_tokens // 1000}k": essay_documents(min_tokens, lm.tokenizer)}
        kv = fp16_kv_bytes_per_token(lm.model.config)
        rows = []
        steps = len(collections) * len(specs)
        for c, (name, documents) in enumerate(collections.items()):
            bench.ingest([(n, t.encode()) for n, t in documents], name, prepare=False)
            corpus = bench.corpus(name)
            for s, spec in enumerate(specs):
                done = (c * len(specs) + s) / steps
                say = (lambda f, m, d=done, l=spec.label: progress(d + f / steps, f"{name} {l}: {m}")) if progress else None
                method, params = spec.method(), spec.params(24)
                with lm.lock.per_step(say) as step:
                    method.prepare(corpus, params, step)
                account = method.storage(corpus, params)
                rows.append(StorageRow(name, spec.label, account.tokens, account.chunk_bytes, dict(account.shared),
                                       account.total, round(account.bytes_per_token, 1),
                                       round(account.chunk_bytes_per_token, 1), kv))
        return rows


def storage_markdown(rows: list[StorageRow]) -> str:
    lines = ["| collection | method | tokens | per-chunk artifacts | shared parts | total | bytes / token, everything "
             "| per-chunk bytes / token | fp16 KV bytes / token | smaller than fp16 KV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shared = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.shared.items()) or "none"
        lines.append(f"| {r.collection} | {r.method} | {r.tokens:,} | {fmt_bytes(r.chunk_bytes)} | {shared} | {fmt_bytes(r.total)} | "
                     f"{r.bytes_per_token:,.1f} | {r.chunk_bytes_per_token:,.1f} | {r.fp16_kv_bytes_per_token:,} | "
                     f"{r.smaller_than_kv:,.0f}x |")
    return "\n".join(lines)


def write_rows(out: Path, stem: str, rows: list, meta: dict, markdown: str) -> list[Path]:
    """A bench command's result files: `stem`.json (meta + rows) and `stem`_summary.md (its table)."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{stem}.json"
    data.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    table = out / f"{stem}_summary.md"
    table.write_text(markdown + "\n")
    return [data, table]


def write_storage(rows: list[StorageRow], out: Path, meta: dict) -> list[Path]:
    return write_rows(out, "storage", rows, meta, storage_markdown(rows))
