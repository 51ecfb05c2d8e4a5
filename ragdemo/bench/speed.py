"""`python -m ragdemo bench-speed`: ingest, retrieval, model load and prefill speed, with ratios measured in
the same run (these machines are noisy, so absolute seconds alone mean little)."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Settings
from ..models.lm import _load, _matmul_gflops, converted_default_dir, quiet_transformers
from ..store import Corpus, Store

SHARED_ESSAYS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paul_graham_essays"
ASSET_ESSAYS = Path(__file__).resolve().parents[2] / "assets" / "paul_graham_essays"


def _say(line: str) -> None:
    print(line, flush=True)


def essay_files(limit: int) -> list[Path]:
    folder = ASSET_ESSAYS if ASSET_ESSAYS.exists() else SHARED_ESSAYS
    return sorted(folder.glob("*.txt"))[:limit]


def bench_ingest(bench, n_files: int) -> float:
    files = essay_files(n_files)
    corpus = bench.corpus("speed-ingest")
    bench.models.lm, bench.models.embedder  # loading is measured separately
    start = time.perf_counter()
    reports = bench.ingest([(p.name, p) for p in files], "speed-ingest")
    seconds = time.perf_counter() - start
    tokens = sum(r.n_tokens for r in reports if r.status == "added")
    _say(f"ingest: {len(files)} essays, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s "
         f"(read + chunk + embed + store; collection {corpus.collection!r})")
    return tokens / seconds


def bench_retrieval(bench, n_chunks: int, queries: int = 50) -> float:
    """Fill a store with n_chunks synthetic chunks (real SQLite rows, random unit vectors) and time Corpus.search."""
    from ..ingest import Chunk

    store = Store(Path(tempfile.mkdtemp(prefix="ragdemo-speed-")))
    cid = store.collection_id("big")
    dim = bench.models.embedder.dim
    rng = np.random.default_rng(0)
    per_doc = 1000
    for d in range(n_chunks // per_doc):
        vectors = rng.standard_normal((per_doc, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [Chunk(i, f"synthetic chunk {d}-{i}", i * 64, (i + 1) * 64, 0, 0) for i in range(per_doc)]
        store.add_document(cid, f"doc{d}", f"sha{d}", 0, "", chunks, vectors, bench.models.embedder.name)
    corpus = Corpus(store, "big", bench.models)
    start = time.perf_counter()
    corpus.index()
    build = time.perf_counter() - start
    corpus.retrieve("warm-up", 5)
    times = [corpus.retrieve(f"question number {i} about essays", 5)[1] for i in range(queries)]
    median = float(np.median(times))
    _say(f"retrieval: {n_chunks} chunks, FAISS build {build:.2f} s, top-5 query (embed + search + fetch) "
         f"median {median * 1000:.1f} ms, p90 {np.percentile(times, 90) * 1000:.1f} ms")
    return median


def bench_load(settings: Settings) -> None:
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        converted_default_dir(Path(tmp))
        _load("default", torch.device("cpu"), torch.float32, {}, Path(tmp))
        cold = time.perf_counter() - start
        start = time.perf_counter()
        _load("default", torch.device("cpu"), torch.float32, {}, Path(tmp))
        warm = time.perf_counter() - start
    _say(f"model load: cold (GGUF dequantize + convert + load) {cold:.1f} s, warm (cached safetensors) {warm:.2f} s, "
         f"ratio {cold / warm:.0f}x")


def flops_per_token(model, context: int) -> float:
    """2 x parameters for the matmuls, plus attention scores and values at the given context length."""
    config = model.config
    params = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size  # embedding lookup is free
    attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context / 2
    return 2 * params + attention


def bench_prefill(settings: Settings, lengths: list[int]) -> None:
    converted_default_dir(settings.cache_dir)
    for dtype in (torch.float32, torch.bfloat16):
        peak = _matmul_gflops(dtype, n=1024, reps=4)
        lm = _load("default", torch.device("cpu"), dtype, {}, settings.cache_dir)
        for n in lengths:
            ids = torch.randint(100, 40000, (1, n))
            with torch.inference_mode():
                lm.model(input_ids=ids[:, :64])
                start = time.perf_counter()
                lm.model(input_ids=ids, logits_to_keep=1)
                seconds = time.perf_counter() - start
            achieved = flops_per_token(lm.model, n) * n / seconds / 1e9
            _say(f"prefill {str(dtype).replace('torch.', ''):>8} {n:>5} tokens: {n / seconds:6.0f} tok/s, "
                 f"{achieved:5.1f} GFLOP/s = {achieved / peak:4.0%} of this run's matmul peak {peak:.0f} GFLOP/s")



def run_speed_bench(bench, quick: bool = False) -> None:
    _say(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, {sys.platform}")
    bench_ingest(bench, 3 if quick else 10)
    bench_retrieval(bench, 10_000 if quick else 100_000, 10 if quick else 50)
    bench_load(bench.settings)
    bench_prefill(bench.settings, [256] if quick else [1024, 4096])
