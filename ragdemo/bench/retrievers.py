"""`python -m ragdemo bench-retrievers`: the binary retriever against the float one on real SQuAD questions.

For each collection size: recall@k of the binary top-k (with rescoring, and Hamming alone) against the exact
float top-k, the gold-paragraph hit rate of both retrievers on the same questions, and both indexes' bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .datasets import load_squad
from ..units import fmt_bytes
from .scratch import scratch_workbench
from .storage import write_rows

MIN_SHARED_CHARS = 20  # a chunk piece this long that lies inside the gold paragraph places the chunk there


@dataclass
class RetrieverRow:
    collection: str
    chunks: int
    questions: int
    k: int
    rescore: int
    recall_at_k: float  # binary (rescored) top-k against float top-k
    recall_at_k_hamming_only: float
    gold_hit_float: float  # share of questions whose top-k holds a chunk of the gold paragraph
    gold_hit_binary: float
    float32_bytes: int
    float_index_bytes: int
    binary_index_bytes: int

    @property
    def smaller_than_float32(self) -> float:
        return self.float32_bytes / max(1, self.binary_index_bytes)


def in_paragraph(chunk_text: str, paragraph: str) -> bool:
    """A chunk belongs to a paragraph when one of its pieces (chunks may straddle a paragraph break) of at least
    MIN_SHARED_CHARS lies inside it."""
    return any(len(piece.strip()) >= MIN_SHARED_CHARS and piece.strip() in paragraph
               for piece in chunk_text.split("\n\n"))


def gold_hit_rate(ids_per_question: list[list[int]], paragraphs: list[str], chunk_text: dict[int, str]) -> float:
    hits = [any(in_paragraph(chunk_text[i], gold) for i in ids if i in chunk_text)
            for ids, gold in zip(ids_per_question, paragraphs)]
    return sum(hits) / max(1, len(hits))


def run_retriever_bench(settings, article_counts: list[int | None], n: int = 100, k: int = 5,
                        rescore: int | None = None, seed: int = 0, progress=None) -> list[RetrieverRow]:
    """One throwaway collection per article count (None = every bundled article); n questions sampled over it."""
    with scratch_workbench(settings, "retrievers") as bench:
        rows = []
        for step, articles in enumerate(article_counts):
            data = load_squad(n=n, seed=seed, articles=articles)
            (haystack,) = data.haystacks
            name = f"squad-{len(haystack.documents)}-articles"
            say = (lambda f, m, s=step: progress((s + f) / len(article_counts), f"{name}: {m}")) if progress else None
            bench.ingest([(d, t.encode()) for d, t in haystack.documents], name, say, prepare=False)
            corpus = bench.corpus(name)
            questions = haystack.questions
            comparison = corpus.compare_retrievers([q.question for q in questions], k, rescore)
            chunk_text = {c["chunk_id"]: c["text"] for c in corpus.store.chunks(corpus.collection_id)}
            paragraphs = [q.meta["paragraph"] for q in questions]
            rows.append(RetrieverRow(
                name, comparison.chunks, len(questions), k, comparison.rescore, round(comparison.recall_at_k, 4),
                round(comparison.recall_at_k_hamming_only, 4),
                round(gold_hit_rate(comparison.float_ids, paragraphs, chunk_text), 4),
                round(gold_hit_rate(comparison.binary_ids, paragraphs, chunk_text), 4),
                comparison.float32_bytes, comparison.float_index_bytes, comparison.binary_index_bytes))
        return rows


def retrievers_markdown(rows: list[RetrieverRow]) -> str:
    lines = ["| collection | chunks | questions | recall@k binary vs float (rescored) | Hamming only | rescore "
             "| gold paragraph in top-k, float | gold paragraph in top-k, binary | float32 embeddings "
             "| float index (fp16) | sign codes | smaller than float32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.collection} | {r.chunks:,} | {r.questions} | {r.recall_at_k:.3f} (k={r.k}) | "
                     f"{r.recall_at_k_hamming_only:.3f} | x{r.rescore} | {r.gold_hit_float:.0%} | {r.gold_hit_binary:.0%} | "
                     f"{fmt_bytes(r.float32_bytes)} | {fmt_bytes(r.float_index_bytes)} | {fmt_bytes(r.binary_index_bytes)} | "
                     f"{r.smaller_than_float32:.0f}x |")
    return "\n".join(lines)


def write_retrievers(rows: list[RetrieverRow], out: Path, meta: dict) -> list[Path]:
    return write_rows(out, "retrievers", rows, meta, retrievers_markdown(rows))
