"""Preparing several methods at once: one shared forward over the chunks (engine/prepare_pass.py), each method
turning its share into its own artifacts, written a batch at a time.

A method that builds per-chunk artifacts from the chunks' forward says what it lacks at its knobs as a
`PassJob`: the chunks to run, what it needs from each (`Needs`), how to turn a batch of results into artifact
rows (`take`), and what is left once every batch ran (`finish`: BTR fits its decoder on all the states and
binarizes). `run_jobs` runs every job's chunks through one pass, each chunk once, writes each batch's rows in one
transaction and reports progress (the step, tokens/s) between batches: a progress callback that raises (Cancel)
stops there, with every stored artifact whole.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..engine.prepare_pass import ChunkPass, Needs, PassRequest, SharedPass
from ..engine.prompt import passage_ids
from ..errors import NotSupported, UserError
from ..store import ArtifactRow, chunk_key
from ..units import fmt_bytes
from .base import Progress

FORWARD_SHARE = 0.9  # of the progress bar, when there is a forward to run


@dataclass
class PassJob:
    """What one method at its knobs still lacks, in terms of the shared pass."""

    label: str
    needs: Needs
    prefix_ids: list[int]  # what its chunks are read behind ([]: nothing)
    chunks: list[dict]  # chunks to run through the model, one per content key
    take: Callable[[list[dict], list[ChunkPass]], list[ArtifactRow]]  # one batch's results -> rows to store
    finish: Callable[[Progress], list[ArtifactRow]] | None = None  # after every batch, e.g. a fit over all chunks


@dataclass
class PassReport:
    """What a shared preparation did: chunk tokens run through the model, and where the seconds went."""

    tokens: int = 0
    forward_s: float = 0.0  # inside the model
    take_s: float = 0.0  # turning results into artifacts (compression, quantisation, serialisation)
    write_s: float = 0.0
    finish_s: float = 0.0
    labels: list[str] = field(default_factory=list)


def unique_chunks(chunks: list[dict], skip: set[str] = frozenset()) -> list[dict]:
    """One chunk per content key (identical chunks share one artifact), in order, without those in `skip`."""
    return list({chunk_key(c["text"]): c for c in chunks if chunk_key(c["text"]) not in skip}.values())


def run_jobs(corpus, jobs: list[PassJob], progress: Progress | None = None) -> PassReport:
    """Run every job's chunks through one shared pass, then each job's `finish`."""
    jobs = [job for job in jobs if job is not None]
    lm, store = corpus.lm, corpus.store
    say = progress or (lambda fraction, message: None)
    report = PassReport(labels=[job.label for job in jobs])
    chunks_of = [{chunk_key(c["text"]): c for c in job.chunks} for job in jobs]
    texts = {key: c["text"] for chunks in chunks_of for key, c in chunks.items()}
    ids = {key: passage_ids(lm.tokenizer, text) for key, text in texts.items()}  # each chunk tokenized once
    requests = [PassRequest(job.needs, {key: ids[key] for key in chunks}, tuple(job.prefix_ids))
                for job, chunks in zip(jobs, chunks_of)]
    shared = SharedPass(lm, requests)
    forward_share = FORWARD_SHARE if shared.total else 0.0
    who = ", ".join(job.label for job in jobs if job.chunks)
    if shared.total:
        say(0.0, f"forward pass: {shared.total:,} chunk tokens for {who}")
    for batch in shared.batches():
        started = time.perf_counter()
        rows = []
        for job, chunks, taken in zip(jobs, chunks_of, batch.taken):
            if taken:
                rows += job.take([chunks[key] for key, _ in taken], [result for _, result in taken])
        written = time.perf_counter()
        store.put_artifacts(rows)
        report.take_s += written - started
        report.write_s += time.perf_counter() - written
        report.tokens, report.forward_s = batch.done, batch.seconds
        rate = batch.done / max(batch.seconds + report.take_s + report.write_s, 1e-9)
        say(forward_share * batch.done / batch.total,
            f"forward pass: {batch.done:,}/{batch.total:,} chunk tokens, {rate:,.0f} tokens/s ({who})")
    finishing = [job for job in jobs if job.finish is not None]
    for i, job in enumerate(finishing):
        started = time.perf_counter()
        low = forward_share + (1 - forward_share) * i / len(finishing)
        step = (lambda f, m, low=low, label=job.label:
                say(low + (1 - forward_share) * f / len(finishing), f"{label}: {m}"))
        rows = job.finish(step)
        written = time.perf_counter()
        store.put_artifacts(rows)
        report.finish_s += written - started
        report.write_s += time.perf_counter() - written
    return report


def stored_or_built(corpus, method, params, digest: str, chunks: list[dict]) -> tuple[dict[str, bytes], int, float]:
    """The per-chunk artifacts an answer reads ({content key: blob}, stored at `digest`); the missing ones are built
    now by the method's shared-pass job and stored. Also how many chunks were built and the seconds that took,
    which the answer reports as prepare_s (preparation, never load or TTFT)."""
    lm = corpus.lm
    keys = [chunk_key(c["text"]) for c in chunks]
    blobs = corpus.store.get_artifacts(method.name, lm.model_id, digest, keys)
    missing = unique_chunks([c for c, key in zip(chunks, keys) if key not in blobs])
    if not missing:
        return blobs, 0, 0.0
    started = time.perf_counter()
    run_jobs(corpus, [method.pass_job(corpus, params, missing)])
    blobs = corpus.store.get_artifacts(method.name, lm.model_id, digest, keys)
    return blobs, len(missing), time.perf_counter() - started


@dataclass
class Prepared:
    """One method's line after a joint preparation: prepared, skipped (cannot run on this model or these knobs),
    or nothing to prepare."""

    name: str
    status: str
    line: str


def prepare_methods(corpus, items: list[tuple], progress: Progress | None = None,
                    skip_unsupported: bool = False) -> tuple[list[Prepared], PassReport]:
    """Prepare several methods (name, method, params) at once: one shared pass for every per-chunk artifact they
    lack, then each method's own `prepare` for what is left (BTR's offline merging, a LoRA with `train`), which
    finds its chunks done. With `skip_unsupported`, a method that cannot run here is reported as skipped and the
    others go on; otherwise its error is raised."""
    say = progress or (lambda fraction, message: None)
    outcomes: dict[str, Prepared] = {}
    ready: list[tuple] = []
    jobs = []
    for name, method, params in items:
        if not method.has_prepare:
            outcomes[name] = Prepared(name, "nothing", f"{name}: nothing to prepare")
            continue
        try:
            jobs.append(method.pass_job(corpus, params) if hasattr(method, "pass_job") else None)
            ready.append((name, method, params))
        except (NotSupported, UserError) as exc:
            if not skip_unsupported:
                raise
            outcomes[name] = Prepared(name, "skipped", f"{name}: not prepared ({exc})")
    report = run_jobs(corpus, jobs, lambda f, m: say(FORWARD_SHARE * f, m))
    for i, (name, method, params) in enumerate(ready):
        low, width = FORWARD_SHARE + (1 - FORWARD_SHARE) * i / len(ready), (1 - FORWARD_SHARE) / len(ready)
        started = time.perf_counter()
        try:
            method.prepare(corpus, params, lambda f, m, low=low, name=name: say(low + width * f, f"{name}: {m}"))
        except (NotSupported, UserError) as exc:
            if not skip_unsupported:
                raise
            outcomes[name] = Prepared(name, "skipped", f"{name}: not prepared ({exc})")
            continue
        report.finish_s += time.perf_counter() - started
        stored = fmt_bytes(method.storage(corpus, params).total)
        outcomes[name] = Prepared(name, "prepared", f"{name}: prepared ({stored} stored)")
    return [outcomes[name] for name, _, _ in items], report
