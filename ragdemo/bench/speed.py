"""`python -m ragdemo bench-speed`: ingest, retrieval, model load and prefill speed, with ratios measured in
the same run (these machines are noisy, so absolute seconds alone mean little). The per-method TTFT breakdown
it ends with is bench/ttft.py (bench-scaling uses it too)."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Settings
from ..models.lm import _load, converted_default_dir, quiet_transformers
from ..models.allocator import keep_freed_memory
from ..models.attention import head_shape
from ..models.probe import best_seconds
from ..store import Corpus, Store
from ..units import fmt_speed
from .scratch import scratch_workbench
from .ttft import Row, bench_methods, ceiling, rotated

__all__ = ["essay_files", "bench_ingest", "bench_retrieval", "bench_load", "flops_per_token", "projection", "matmul_peak",
           "layer_matmul_peak", "attention_kernel_seconds", "model_attention_kernel", "share_of_peak", "share_of_time",
           "bench_prefill", "attention_paths", "speed_record", "run_speed_bench",
           "Row", "ceiling", "rotated"]  # the last three live in bench/ttft.py and bench/order.py

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
    """Fill a temporary store with n_chunks synthetic chunks (real SQLite rows, random unit vectors) and time
    Corpus.retrieve (embed + search + fetch) for both retrievers, with the question embedding alone beside it.
    Returns the float retriever's median seconds."""
    from ..ingest import Chunk

    embedder = bench.models.embedder
    questions = [f"question number {i} about essays" for i in range(queries)]
    with tempfile.TemporaryDirectory(prefix="ragdemo-speed-") as home:
        store = Store(Path(home))
        rng = np.random.default_rng(0)
        per_doc, cid = 1000, store.collection_id("big")
        for d in range(n_chunks // per_doc):
            vectors = rng.standard_normal((per_doc, embedder.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            chunks = [Chunk(i, f"synthetic chunk {d}-{i}", i * 64, (i + 1) * 64, 0, 0) for i in range(per_doc)]
            store.add_document(cid, f"doc{d}", f"sha{d}", 0, "", chunks, vectors, embedder.name)
        embedder.embed(["warm-up"])
        embed = [_seconds(embedder.embed, [q]) for q in questions]
        lines = []
        for retriever in ("float", "binary"):
            corpus = Corpus(store, "big", bench.models, retriever=retriever)
            start = time.perf_counter()
            index = corpus.index()
            build = time.perf_counter() - start
            corpus.retrieve("warm-up", 5)
            times = [corpus.retrieve(q, 5)[1] for q in questions]
            lines.append((retriever, build, index.nbytes, times))
        store.close()
    _say(f"retrieval: {n_chunks} chunks, top-5; question embedding alone median {np.median(embed) * 1000:.1f} ms")
    for retriever, build, nbytes, times in lines:
        _say(f"  {retriever:>6} retriever: index {nbytes / 1e6:.1f} MB built in {build:.2f} s; embed + search + fetch "
             f"median {np.median(times) * 1000:.1f} ms, p90 {np.percentile(times, 90) * 1000:.1f} ms")
    return float(np.median(lines[0][3]))


def _seconds(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


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


def flops_per_token(model, context: int) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) per prompt token at this prompt length: 2 x parameters (the embedding
    lookup is free), plus causal attention scores and values over on average context/2 keys."""
    config = model.config
    params = sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size
    heads, _, head_dim = head_shape(config)
    attention = 2 * 2 * config.num_hidden_layers * heads * head_dim * context / 2
    return 2 * params, attention


def projection(model):
    """`project(x, weight)` through the kernel the model's own projections use: oneDNN with a pre-packed weight
    when models/packed.py packed them at load, else F.linear (in fp32 that is MKL, several times slower on AMD
    CPUs), so the peak and the prefill it is compared with run the same kernel."""
    from ..models.packed import PackedLinear, packed_linear

    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        return lambda x, weight: torch.nn.functional.linear(x, weight)
    return packed_linear


SQUARE_N = 1024  # the square probe's side


def matmul_peak(model, dtype: torch.dtype, n: int = SQUARE_N, reps: int = 3) -> float:
    """GFLOP/s of one n x n x n product through the model's projection kernel (`projection`), best of `reps`;
    the first call pays for kernel selection (and packing)."""
    project = projection(model)
    x, weight = torch.randn(n, n, dtype=dtype), torch.nn.Parameter(torch.randn(n, n, dtype=dtype), requires_grad=False)
    with torch.inference_mode():
        project(x, weight)
        best = float("inf")
        for _ in range(reps):
            started = time.perf_counter()
            project(x, weight)
            best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best / 1e9


def layer_matmul_peak(model, n: int, dtype: torch.dtype, reps: int = 3) -> float:
    """GFLOP/s of one decoder layer's own projections (every nn.Linear of layer 0, in order) on n tokens through
    the model's projection kernel, best of `reps`: what the model's matmuls can reach at this length, whose
    shapes (K and N of 192 to 1536 here) sit further from the kernels' best than the square probe's."""
    project = projection(model)
    shapes = [(m.in_features, m.out_features) for m in model.model.layers[0].modules()
              if isinstance(m, torch.nn.Linear)]
    pairs = [(torch.randn(n, i, dtype=dtype), torch.nn.Parameter(torch.randn(o, i, dtype=dtype), requires_grad=False))
             for i, o in shapes]
    flops = sum(2 * n * i * o for i, o in shapes)
    best = float("inf")
    with torch.inference_mode():
        for x, weight in pairs:  # first calls pay for kernel selection (and packing)
            project(x, weight)
        for _ in range(reps):
            started = time.perf_counter()
            for x, weight in pairs:
                project(x, weight)
            best = min(best, time.perf_counter() - started)
    return flops / best / 1e9


def attention_kernel_seconds(lm, n: int) -> dict:
    """One layer's attention alone on n causal tokens at the model's head shape, per kernel it could run
    (SDPA's, and the blocked one of models/attention.py in bf16), one interleaved round."""
    from ..models.attention import causal_inputs, causal_kernels

    shape = head_shape(lm.model.config)
    kernels = causal_kernels(*shape, n)
    if lm.dtype != torch.bfloat16:
        kernels.pop("blocked")
    with torch.inference_mode():
        return best_seconds(kernels, causal_inputs(*shape, n, lm.dtype), rounds=1, reps=1)


def model_attention_kernel(lm, rows: int) -> str:
    """The kernel the model's causal prefill of `rows` tokens runs: the blocked one hands short ones to SDPA."""
    from ..models.attention import MIN_ROWS, NAME

    return "blocked" if lm.model.config._attn_implementation == NAME and rows >= MIN_ROWS else "SDPA"


def share_of_peak(achieved: float, peak: float) -> str:
    """A share of the measured peak; a prefill above it means the peak probe was unlucky, so no share is shown."""
    if peak <= 0 or achieved > peak:
        return f"above this run's matmul probe ({peak:.1f} GFLOP/s): no share shown"
    return f"{achieved / peak:4.0%} of this run's matmul peak {peak:.1f} GFLOP/s"


def share_of_time(share: float) -> str:
    """Attention's share of a prefill's time, from two timings taken apart; above 1 they disagree (load came
    and went between them), so no share is shown rather than one above 100%."""
    if share > 1:
        return "longer than this whole prefill (the two timings disagree: noise), so no share"
    return f"{share:.0%} of this prefill's time"


def bench_prefill(settings: Settings, lengths: list[int], rounds: int = 3) -> list[dict]:
    """Prefill throughput of the model in fp32 and bf16 against the matmul peak measured in between: the peak and
    each prefill are the best of `rounds` interleaved probes, so load that comes and goes hits both alike. The
    peak is the best of every probe (the square one and the model's layer shapes at each length): on a CPU with
    AMX the square 1024^3 probe reached 1.3 TFLOP/s while the layer shapes at 4k tokens reached 2.4, so a share
    of the square probe alone would overstate, or print above 100%."""
    model_id = settings.model_id
    source_dir = settings.cache_dir
    if model_id in ("default", "", None):
        converted_default_dir(source_dir)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        lm = _load(model_id, torch.device("cpu"), dtype, {}, source_dir, attention=settings.attention or "auto")
        peak, best = 0.0, {n: float("inf") for n in lengths}
        shaped, kernel = {n: 0.0 for n in lengths}, {n: {} for n in lengths}
        with torch.inference_mode():
            lm.model(input_ids=torch.randint(100, 1000, (1, 64)))
            for _ in range(rounds):
                peak = max(peak, matmul_peak(lm.model, dtype))
                for n in lengths:
                    shaped[n] = max(shaped[n], layer_matmul_peak(lm.model, n, dtype, reps=1))
                    for name, seconds in attention_kernel_seconds(lm, n).items():
                        kernel[n][name] = min(kernel[n].get(name, float("inf")), seconds)
                    ids = torch.randint(100, 1000, (1, n))
                    started = time.perf_counter()
                    lm.model(input_ids=ids, logits_to_keep=1)
                    best[n] = min(best[n], time.perf_counter() - started)
        name = str(dtype).replace("torch.", "")
        square, peak = peak, max(peak, *shaped.values())  # a peak no probe beat: no share can exceed 100%
        _say(f"prefill {name:>8}: {lm.packing}; attention: {lm.attention}")
        _say(f"  matmul peak {peak:.1f} GFLOP/s: the best of the square {SQUARE_N}^3 probe ({square:.1f}) and the "
             f"model's own layer shapes at " + ", ".join(f"{n} tokens ({shaped[n]:.1f})" for n in lengths)
             + f", each the best of {rounds} interleaved rounds")
        attention_paths(lm, name, lengths, rounds=rounds)
        for n in lengths:
            matmul, attention = flops_per_token(lm.model, n)
            achieved = (matmul + attention) * n / best[n] / 1e9
            used = model_attention_kernel(lm, n)
            attention_time = kernel[n][used] * lm.n_layers / best[n]
            rows.append({"dtype": name, "tokens": n, "seconds": best[n], "gflops": achieved, "peak": peak,
                         "layer_peak": shaped[n], "attention_share": attention / (matmul + attention),
                         "attention_kernel": used,
                         "attention_gflops": attention * n / lm.n_layers / kernel[n][used] / 1e9,
                         "sdpa_attention_gflops": attention * n / lm.n_layers / kernel[n]["SDPA"] / 1e9,
                         "attention_time_share": attention_time})
            _say(f"prefill {name:>8} {n:>5} tokens: {n / best[n]:6.0f} tok/s, {achieved:5.1f} GFLOP/s = "
                 f"{share_of_peak(achieved, peak)}; attention is {attention / (matmul + attention):.0%} of the FLOPs "
                 f"(best of {rounds})")
            _say(f"  the model's own projections at {n} tokens (one layer's Linear shapes, no attention): "
                 f"{shaped[n]:.1f} GFLOP/s = {shaped[n] / peak:.0%} of the peak; the prefill is "
                 f"{share_of_peak(achieved, shaped[n]).replace('this run', 'this shape')}")
            other = "" if used == "SDPA" else f" (SDPA's causal kernel: {rows[-1]['sdpa_attention_gflops']:.1f})"
            _say(f"  attention alone (the model's {used} kernel, causal, one layer, best of {rounds}): "
                 f"{rows[-1]['attention_gflops']:.1f} GFLOP/s{other}, so {lm.n_layers} layers of it take "
                 f"{share_of_time(attention_time)} for {rows[-1]['attention_share']:.0%} of its FLOPs")
    return rows


def attention_paths(lm, dtype_name: str, lengths: list[int], layers: int = 4, rounds: int = 3) -> list[dict]:
    """The engine's `run_layers` over its first `layers` layers with an explicit [1,1,n,n] causal mask against
    no mask (the kernel's own causal path), and, where the model runs the blocked kernel, against SDPA's with
    no mask; best of `rounds` interleaved runs. `resolve_mask` takes the no-mask path whenever no cached keys
    precede the queries, so this prints whether that is the faster one, and how far the outputs differ."""
    from ..engine.layers import causal_mask, embed, positions, run_layers

    used = lm.model.config._attn_implementation
    rows = []
    with torch.inference_mode():
        for n in lengths:
            hidden = embed(lm, torch.randint(100, 1000, (1, n)))
            pos = positions(0, n, lm.device)
            paths = {"explicit mask": (used, causal_mask(n, n, lm.device)), "causal kernel": (used, None)}
            if model_attention_kernel(lm, n) != "SDPA":
                paths["SDPA"] = ("sdpa", None)
            best, out = {name: float("inf") for name in paths}, {}
            try:
                for _ in range(rounds):
                    for name, (implementation, mask) in paths.items():
                        lm.model.set_attn_implementation(implementation)
                        started = time.perf_counter()
                        out[name] = run_layers(lm, hidden, 0, layers, pos, mask)
                        best[name] = min(best[name], time.perf_counter() - started)
            finally:
                lm.model.set_attn_implementation(used)
            diff = float((out["explicit mask"].float() - out["causal kernel"].float()).abs().max())
            speedup = best["explicit mask"] / best["causal kernel"]
            rows.append({"dtype": dtype_name, "tokens": n, "layers": layers, "mask_s": best["explicit mask"],
                         "kernel_s": best["causal kernel"], "max_abs_diff": diff})
            line = (f"attention {dtype_name:>8} {n:>5} tokens, {layers} layers: explicit mask "
                    f"{1000 * best['explicit mask']:7.1f} ms, causal kernel {1000 * best['causal kernel']:7.1f} ms "
                    f"(the kernel {fmt_speed(speedup, 'the mask')}; the engine uses the causal kernel); "
                    f"max |difference| {diff:.1e}")
            if "SDPA" in paths:
                sdpa = out["SDPA"].float()
                sdpa_diff = float((sdpa - out["causal kernel"].float()).abs().max())
                relative = sdpa_diff / float(sdpa.abs().max())  # the residual stream holds values in the hundreds
                rows[-1].update(sdpa_s=best["SDPA"], sdpa_max_abs_diff=sdpa_diff, sdpa_rel_diff=relative)
                line += (f"; SDPA's kernel {1000 * best['SDPA']:7.1f} ms, the blocked one "
                         f"{fmt_speed(best['SDPA'] / best['causal kernel'], 'SDPA')}, max |difference| {sdpa_diff:.1e} "
                         f"= {relative:.1e} of the largest |state|")
            _say(line)
    return rows


def speed_record(found: dict) -> dict:
    """What `run_speed_bench` measured, as data a card can quote: per configuration its median TTFT parts (ms),
    the speed-up over RAG in this run and its ceiling; the prefill rows as they are."""
    rows = found["methods"]
    rag, floor = rows[0], found["question_floor_s"]
    methods = [{"label": row.label, "method": row.method, "knobs": row.knobs, "lora": row.lora,
                "ms": {part: round(1000 * row.median(part), 2)
                       for part in ("ttft", "retrieve", "load", "prefill", "first", "overhead")},
                "speedup": rag.median("ttft") / row.median("ttft"), "ceiling": ceiling(row, rag, floor)}
               for row in rows]
    return {"methods": methods, "question_floor_ms": round(1000 * floor, 2), "prefill": found["prefill"]}


def run_speed_bench(bench, quick: bool = False) -> dict:
    """Every section in a temporary store that is removed afterwards; returns the prefill and method rows."""
    lm = bench.models.lm
    _say(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, {sys.platform}, load average "
         f"{os.getloadavg()[0]:.1f}; model dtype {str(lm.dtype).replace('torch.', '')}"
         + (f" ({lm.dtype_reason})" if getattr(lm, "dtype_reason", "") else ""))
    _say(f"projections: model {lm.packing or 'not packed'}; embedder {bench.models.embedder.packing or 'not packed'}")
    _say(f"attention: {lm.attention or 'SDPA'}")
    _say(keep_freed_memory())
    with scratch_workbench(bench.settings, "speed") as temp:
        bench_ingest(temp, 3 if quick else 10)
        bench_retrieval(bench, 10_000 if quick else 100_000, 10 if quick else 50)
        bench_load(bench.settings)
        prefill = bench_prefill(bench.settings, [256] if quick else [256, 1024, 4096], rounds=2 if quick else 3)
        methods, floor = bench_methods(temp, quick)
    _say(f"load average at the end {os.getloadavg()[0]:.1f}")
    return {"prefill": prefill, "methods": methods, "question_floor_s": floor}
