"""`python -m ragdemo ingest|ask|prepare|list|delete|bench-speed ...`: everything the UI can do.

One file on purpose: each `cmd_*` is a short wrapper over a Workbench or bench/ call (the work lives there), and
`build_parser` beside them is the one list of every command's flags and help.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from pathlib import Path

from .config import Settings
from .errors import UserError
from .units import fmt_bytes, fmt_s

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _settings(args) -> Settings:
    return Settings().with_(model_id=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                            max_new_tokens=args.max_new_tokens)


def _progress_bar(desc: str, stream=None):
    """(context, update): a bar on a terminal; elsewhere (logs, pipes) one plain line per stage, no \\r frames."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return contextlib.nullcontext(), _plain_progress(desc, stream)
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, file=stream, leave=False, bar_format="{l_bar}{bar}|")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * max(0.0, min(1.0, fraction))))
        # the message goes into the format itself: tqdm's postfix field would prefix it with ", "
        bar.bar_format = "{l_bar}{bar}| " + message[:60].replace("{", "{{").replace("}", "}}")
        bar.refresh()

    return bar, update


def _plain_progress(desc: str, stream):
    """One line when the stage (the message before its first ':' or '…') changes."""
    last = [None]

    def update(fraction: float, message: str) -> None:
        stage = message.split(":")[0].split("…")[0].strip()
        if stage != last[0]:
            last[0] = stage
            print(f"{desc}: {message}", file=stream, flush=True)

    return update


def parse_knobs(pairs: list[str]) -> dict[str, dict]:
    """`--set rag.k=3 --set retro.stride=16` -> {"rag": {"k": "3"}, "retro": {"stride": "16"}}."""
    knobs: dict[str, dict] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        method, dot, knob = key.partition(".")
        if not sep or not dot or not knob:
            raise UserError(f"--set takes METHOD.KNOB=VALUE, got {pair!r}")
        knobs.setdefault(method.strip(), {})[knob.strip()] = value.strip()
    return knobs


def cmd_ingest(bench, args) -> int:
    files = [(Path(p).name, Path(p)) for p in args.paths]
    if args.retriever or args.rescore is not None:  # --rescore 0 is refused, not ignored
        settings = bench.set_retrieval(args.collection, args.retriever, args.rescore)
        print(f"retriever: {settings['retriever']} (binary rescore x{settings['rescore']})")
    bar, update = _progress_bar("ingest")
    with bar:
        reports = bench.ingest(files, args.collection, update, prepare=not args.no_prepare)
    failed = [r for r in reports if r.status == "error"]
    for report in reports:
        if report.status != "error":
            print(f"{report.status}: {report.message}")
        elif len(failed) > 1:
            print(f"failed: {report.message}", file=sys.stderr)
    if len(failed) == 1:
        raise UserError(failed[0].message)
    if failed:
        raise UserError(f"{len(failed)} of {len(reports)} files were not ingested (listed above)")
    return 0


def cmd_ask(bench, args) -> int:
    from .methods import parse_methods
    from .workbench import DEFAULT_METHODS

    methods = parse_methods(args.methods, DEFAULT_METHODS)
    knobs = parse_knobs(args.set)
    bench.check_question(args.question)
    bench.corpus(args.collection, create=False)  # a missing collection is said before any model loads
    ctx, update = _progress_bar("ask")
    with ctx:  # every knob checked before the first method answers (loading the model, with progress, if needed)
        bench.method_params(methods, knobs, update)
        if not args.json:
            bench.warm(args.collection, update)  # model, embedder, index: said here, not a silent first answer
    if args.json:
        # libraries sometimes print to stdout; with --json, stdout carries the JSON array and nothing else
        with contextlib.redirect_stdout(sys.stderr):
            results = bench.ask(args.question, methods, args.collection, knobs, retriever=args.retriever,
                                repeats=args.repeat)
        print(json.dumps([r.to_dict() for r in results], indent=1))
        _say_if_busy(results)
        return 0
    ctx, update = _progress_bar("ask")
    with ctx:
        bench.warm(args.collection, update)  # model, embedder, index: said here, not a silent first answer
    # one Compare (one deadline); each method says when it starts, so a long wait names its method
    results = bench.compare(args.question, methods, args.collection, knobs, _answering(), retriever=args.retriever,
                            repeats=args.repeat)
    for r in results:
        print(f"== {r.method} ({r.model})")
        print(r.error or r.answer)
        print(f"   prompt {r.prompt_tokens:g} tok, processed {r.processed_tokens:g}, cached {r.cached_tokens:g} | "
              f"retrieve {_timed(r, 'retrieve_s')}, load {_timed(r, 'load_s')}, TTFT {_timed(r, 'ttft_s')}, decode "
              f"{_timed(r, 'decode_s')}, total {_timed(r, 'total_s')} ({r.decode_tok_s:.1f} tok/s) | storage read "
              f"{fmt_bytes(r.storage_bytes)}"
              + (f" | prepared on first use {r.prepare_s:.1f}s" if r.prepare_s else ""))
        for note in r.notes:
            print(f"   note: {note}")
    _say_if_busy(results)
    return 0


def _timed(result, name: str) -> str:
    """A time as the card shows it: the median of the runs with their range when the answer was repeated."""
    runs = result.timings.get(name) if result.timings.get("repeats", 1) > 1 else None
    said = fmt_s(getattr(result, name))
    return f"{said} (median of {len(runs)}: {fmt_s(min(runs))}–{fmt_s(max(runs))})" if runs else said


def _say_if_busy(results) -> None:
    from .machine import CpuShare

    shares = [r.timings.get("others_cpu") for r in results if r.timings.get("others_cpu") is not None]
    if shares and CpuShare(0.0, max(shares)).unreliable:
        print(f"warning: {CpuShare(0.0, max(shares)).warning()}", file=sys.stderr)


def _answering():
    from .workbench import CompareListener

    class Answering(CompareListener):
        def started(self, method: str) -> None:
            print(f"{method}: answering…", file=sys.stderr, flush=True)

    return Answering()


def cmd_prepare(bench, args) -> int:
    from .methods import parse_methods, registry

    names = parse_methods(args.methods, [n for n, m in registry().items() if m.has_prepare] or ["rag"])
    bar, update = _progress_bar("prepare")
    with bar:
        lines = bench.prepare(names, args.collection, parse_knobs(args.set), update)
    print("\n".join(lines))
    return 0


def cmd_finetune(bench, args) -> int:
    bar, update = _progress_bar("finetune")
    with bar:
        summary = bench.finetune(args.method, args.collection, parse_knobs(args.set), update)
    print(summary)
    return 0


def cmd_knobs(bench, args) -> int:
    """Every method's knobs as the Methods tab shows them: default, what is accepted, what it does."""
    from .methods import parse_methods, registry
    from .params import knob_table

    for name in parse_methods(args.methods, list(registry())):
        print(f"## {name}  (--set {name}.KNOB=VALUE)\n\n{knob_table(registry()[name].Params)}\n")
    return 0


def cmd_list(bench, args) -> int:
    name = args.collection or bench.settings.default_collection
    if name not in {c["name"] for c in bench.store.collections()}:
        raise UserError(f"no collection named {name!r} (see 'python -m ragdemo collections')")
    docs, shared = bench.documents(name), bench.shared_storage(name)
    if args.json:
        print(json.dumps({"documents": docs, "shared_storage": shared}, indent=1))
        return 0
    if not docs:
        print(f"collection {args.collection or bench.settings.default_collection!r} is empty")
    for d in docs:
        storage = ", ".join(f"{m} {fmt_bytes(b)}" for m, b in d["storage"].items()) or "no method artifacts"
        print(f"{d['id']:>5}  {d['name']}  {d['n_tokens']} tokens  {d['n_chunks']} chunks  {fmt_bytes(d['size'])}  [{storage}]")
    if shared:
        print(f"{'':>5}  shared by every document: " + ", ".join(f"{m} {fmt_bytes(b)}" for m, b in shared.items()))
    return 0


def cmd_demo(bench, args) -> int:
    from .workbench import DEMO_COLLECTION

    bar, update = _progress_bar("demo")
    with bar:
        reports = bench.load_demo(update, prepare=not args.no_prepare)
    for report in reports:
        print(f"{report.status}: {report.message}")
    print(f"collection {DEMO_COLLECTION!r} is ready. Example questions (gold answers):")
    for question, answers in bench.demo_examples():
        print(f"  {question}  [{' | '.join(answers)}]")
    print(f"try: python -m ragdemo ask {bench.demo_examples(1)[0][0]!r} --collection {DEMO_COLLECTION}")
    return 0


def cmd_collections(bench, args) -> int:
    if args.rename:
        bench.rename_collection(args.rename[0], args.rename[1])
        print(f"renamed {args.rename[0]!r} to {args.rename[1]!r}")
    elif args.delete:
        if not args.yes:
            raise UserError(f"deleting {args.delete!r} removes its documents and prepared artifacts; add --yes to confirm")
        bench.delete_collection(args.delete)
        print(f"deleted collection {args.delete!r}")
    elif args.create:
        bench.create_collection(args.create)
        print(f"created collection {args.create!r}")
    for c in bench.store.collections():
        print(f"{c['name']}  {c['documents']} documents  {c['tokens']} tokens")
    return 0


def cmd_delete(bench, args) -> int:
    doc = bench.delete(args.doc, args.collection)
    print(f"deleted {doc['name']} (id {doc['id']})")
    for line in doc["dropped"]:
        print(f"dropped: {line}")
    return 0


class _Tee(io.TextIOBase):
    """Standard output that is also kept, so a bench's printed report can be written to a results file."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def cmd_bench_speed(bench, args) -> int:
    from .bench.speed import run_speed_bench

    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        run_speed_bench(bench, args.quick)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.txt").write_text(tee.kept.getvalue())
        print(f"wrote {out / 'speed.txt'}")
    return 0


def cmd_bench_scaling(bench, args) -> int:
    """Where each method wins: TTFT, its parts, token-layers, bytes read and value kept over two ladders of
    context sizes, with each method's ceiling and share from the same run."""
    from .bench.scaling import QUICK_SCALING, ScalingPlan, write_scaling
    from .bench.scaling_run import run_scaling_bench

    base = QUICK_SCALING if args.quick else ScalingPlan()
    plan = ScalingPlan(ks=tuple(_ints_arg(args.ks, "--ks")) if args.ks is not None else base.ks,
                       documents=tuple(_ints_arg(args.documents, "--documents")) if args.documents is not None
                       else base.documents,
                       questions=args.n or base.questions, articles=base.articles, facts=args.facts or base.facts,
                       overrides=parse_knobs(args.set))  # --set btr.split=2: over every row of that method
    tee = _Tee(sys.stdout)
    bar, update = _progress_bar("bench-scaling")
    with bar, contextlib.redirect_stdout(tee):
        record = run_scaling_bench(bench, plan, args.methods, update)
    if args.out:
        written = write_scaling(record, tee.kept.getvalue(), Path(args.out))
        print("wrote " + ", ".join(map(str, written)))
    return 0


def _ints_arg(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag} takes positive numbers, got {text!r}")
    return values


def cmd_bench_order(bench, args) -> int:
    from .bench.datasets import load_squad
    from .bench.order import format_rows, run_order_bench, write_order
    from .methods import parse_methods
    from .workbench import DEFAULT_METHODS

    methods = parse_methods(args.methods, DEFAULT_METHODS)
    data = load_squad(n=args.n, seed=args.seed, articles=args.articles)
    (haystack,) = data.haystacks
    load_start = os.getloadavg()[0]
    print(f"{data.description}; {len(methods)} methods, each question in a fresh process; "
          f"load average at start {load_start:.2f}", file=sys.stderr)
    bar, update = _progress_bar("bench-order")
    with bar:
        rows = run_order_bench(bench.settings, methods, [q.question for q in haystack.questions],
                               haystack.documents, update)
    print(format_rows(rows))
    load_end = os.getloadavg()[0]
    print(f"load average at end {load_end:.2f}")
    if args.out:
        lm = bench.models.lm
        written = write_order(rows, Path(args.out), {"model": lm.model_id, "dtype": str(lm.dtype), "methods": methods,
                                                     "questions": len(haystack.questions), "load_start": load_start,
                                                     "load_end": load_end, "description": data.description})
        print("wrote " + ", ".join(map(str, written)))
    return 0 if all(r.meets_target for r in rows) else 1


def cmd_bench_storage(bench, args) -> int:
    from .bench.storage import run_storage_bench, storage_markdown, write_storage

    bar, update = _progress_bar("bench-storage")
    with bar:
        rows = run_storage_bench(bench.settings, args.methods or "btr@bits=1,lloco@c=4", args.min_tokens, update)
    lm = bench.models.lm
    written = write_storage(rows, Path(args.out), {"model": lm.model_id, "dtype": str(lm.dtype),
                                                   "min_tokens": args.min_tokens, "methods": args.methods})
    print(storage_markdown(rows))
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_bench_prepare(bench, args) -> int:
    from .bench.prepare import prepare_markdown, run_prepare_bench, write_prepare
    from .methods import parse_methods

    methods = parse_methods(args.methods, []) if args.methods else None
    bar, update = _progress_bar("bench-prepare")
    with bar:
        rows, meta = run_prepare_bench(bench.settings, args.path, args.articles, args.seed, methods,
                                       parse_knobs(args.set), args.quick, update)
    print(prepare_markdown(rows))
    if args.out:
        meta["command"] = "python -m ragdemo " + " ".join(sys.argv[1:])
        print("wrote " + ", ".join(map(str, write_prepare(rows, Path(args.out), meta))))
    return 0


def cmd_bench_retrievers(bench, args) -> int:
    from .bench.retrievers import retrievers_markdown, run_retriever_bench, write_retrievers

    counts = [None if a == "all" else int(a) for a in args.articles.split(",")]
    bar, update = _progress_bar("bench-retrievers")
    with bar:
        rows = run_retriever_bench(bench.settings, counts, args.n, args.k, args.rescore, args.seed, update)
    written = write_retrievers(rows, Path(args.out), {"embedder": bench.settings.embedder_id, "n": args.n, "k": args.k,
                                                      "seed": args.seed, "articles": args.articles})
    print(retrievers_markdown(rows))
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_bench_frontier(bench, args) -> int:
    from .bench.plots import plot_runs_speedup
    from .bench.report import load_run_or_summary

    files = [Path(f) / "results.json" if Path(f).is_dir() else Path(f) for f in args.runs]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise UserError(f"no bench results at {', '.join(missing)}")
    try:
        runs = [load_run_or_summary(f) for f in files]
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    path = plot_runs_speedup(runs, args.method, Path(args.out))
    if path is None:
        raise UserError(f"fewer than two measured '{args.method}' rows with value kept and TTFT in those runs")
    print(f"wrote {path}")
    return 0


def cmd_results(bench, args) -> int:
    """The one results suite every screen quotes: run it, then write docs/RESULTS.md and the README's tables."""
    from .bench.command import as_command
    from .bench.suite import SUITE_DIR, run_suite
    from .cards import load_suite
    from .cards.docs import write_pages

    out = Path(args.out) if args.out else SUITE_DIR
    sections = [s.strip() for s in args.sections.split(",")] if args.sections else None
    bar, update = _progress_bar("results")
    with bar, contextlib.redirect_stdout(sys.stderr):
        record = run_suite(bench.settings, out, args.quick, as_command(sys.argv[1:]) if sys.argv[1:2] == ["results"]
                           else "python -m ragdemo results", sections, progress=update)
    written = write_pages(load_suite(out))
    print(f"results suite in {out} ({record['wall_s'] / 60:.0f} min; load average "
          f"{(record['load_start'] or ['?'])[0]} at the start, {(record['load_end'] or ['?'])[0]} at the end)")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_methods(bench, args) -> int:
    """What the Methods tab shows: every method with its measured headline, or one method's whole card."""
    from .cards import card_markdown, headline, win_sentences
    from .methods import get_method, registry
    from .ui.methods_tab import knob_table  # the Methods tab's own table

    if args.name:
        get_method(args.name)  # an unknown name is one error line
        print(card_markdown(args.name))
        print(f"\nKnobs (--set {args.name}.KNOB=VALUE):\n\n{knob_table(registry()[args.name].Params)}")
        return 0
    for name, cls in registry().items():
        print(f"{name}: {cls.label}\n   measured: {headline(name)}")
    wins = win_sentences()
    if wins:
        print("\nWhere each method wins (the results suite's bench-scaling):\n" + "\n".join(f"- {w}" for w in wins))
    return 0


def cmd_bench(bench, args) -> int:
    from .bench.command import cmd_bench as run

    return run(bench, args, parse_knobs, _progress_bar)


COMMANDS = {"ingest": cmd_ingest, "ask": cmd_ask, "prepare": cmd_prepare, "list": cmd_list, "delete": cmd_delete,
            "knobs": cmd_knobs,
            "demo": cmd_demo, "collections": cmd_collections,
            "bench": cmd_bench,
            "finetune": cmd_finetune,
            "bench-speed": cmd_bench_speed, "bench-order": cmd_bench_order, "bench-scaling": cmd_bench_scaling,
            "bench-storage": cmd_bench_storage, "bench-retrievers": cmd_bench_retrievers,
            "bench-frontier": cmd_bench_frontier, "results": cmd_results, "methods": cmd_methods,
            "bench-prepare": cmd_bench_prepare}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--collection", default=None, help="collection name (default: 'default')")
    common.add_argument("--model", default=None, help="'default' (embedded SmolLM2-135M), a hub id or a local path")
    common.add_argument("--device", default=None, help="auto, cpu, cuda or mps")
    common.add_argument("--dtype", default=None, help="auto, fp32, bf16 or fp16")
    common.add_argument("--quantize", default=None, choices=None, help="4bit or 8bit (CUDA only)")
    common.add_argument("--max-new-tokens", type=int, default=None)
    common.add_argument("--set", action="append", default=[], metavar="METHOD.KNOB=VALUE", help="a method knob")
    parser = _Parser(prog="python -m ragdemo", description="ragdemo: efficient retrieval-augmented LMs, side by side")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("ingest", parents=[common], help="add documents to a collection")
    p.add_argument("paths", nargs="+")
    p.add_argument("--retriever", choices=["float", "binary"], default=None,
                   help="store this retriever with the collection: exact float vectors, or 1-bit codes + rescoring")
    p.add_argument("--rescore", type=int, default=None, help="binary retriever: rescore the top k x RESCORE (default 10)")
    p.add_argument("--no-prepare", action="store_true",
                   help="store the documents only; methods build their offline artifacts on first use")
    p = sub.add_parser("ask", parents=[common], help="answer a question with several methods")
    p.add_argument("question")
    p.add_argument("--methods", default=None, help="comma-separated, e.g. closed_book,full_context,rag")
    p.add_argument("--json", action="store_true", help="print a JSON array of Result objects, nothing else")
    p.add_argument("--repeat", type=int, default=1, choices=[1, 3, 5],
                   help="answers per method: times are the median of the runs (their range beside them)")
    p.add_argument("--retriever", choices=["float", "binary"], default=None,
                   help="for this question only (default: the collection's, set with ingest --retriever)")
    p = sub.add_parser("prepare", parents=[common], help="build the methods' offline artifacts")
    p.add_argument("--methods", default=None)
    p = sub.add_parser("finetune", parents=[common], help="train a method's per-collection adapter (e.g. lloco)")
    p.add_argument("--method", required=True)
    p = sub.add_parser("knobs", parents=[common], help="each method's knobs: default, allowed values, what they do")
    p.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    p = sub.add_parser("list", parents=[common], help="list the documents of a collection")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", parents=[common], help="load the bundled SQuAD article as collection 'demo', prepared")
    p.add_argument("--no-prepare", action="store_true", help="store the article only")
    p = sub.add_parser("collections", parents=[common], help="list, create, rename or delete collections")
    p.add_argument("--create", metavar="NAME")
    p.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"))
    p.add_argument("--delete", metavar="NAME")
    p.add_argument("--yes", action="store_true", help="confirm --delete")
    p = sub.add_parser("delete", parents=[common], help="delete a document (id, name or sha256 prefix)")
    p.add_argument("doc")
    p = sub.add_parser("bench-speed", parents=[common], help="ingest, retrieval, load and prefill speed on this machine")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    p.add_argument("--out", default=None, help="also write the report to OUT/speed.txt (e.g. assets/results/speed)")
    p = sub.add_parser("bench-scaling", parents=[common],
                       help="where each method wins: TTFT and its ceiling as the context grows (k = 2-40 chunks, "
                            "documents of 1k-7k tokens)")
    p.add_argument("--methods", default="rag,lloco,cacheblend,btr", help="variants as METHOD@KNOB=VALUE; rag is the reference")
    p.add_argument("--ks", default=None, help="retrieved ladder: chunks per answer (default 2,5,10,20,32,40; '' for none)")
    p.add_argument("--documents", default=None,
                   help="document ladder: document sizes in tokens (default 1024,2048,4096,7168; '' for none)")
    p.add_argument("--n", type=int, default=None, help="SQuAD questions per retrieved size (default 10)")
    p.add_argument("--facts", type=int, default=None, help="made-up facts (questions) per document (default 5, at most 12)")
    p.add_argument("--quick", action="store_true", help="two small sizes per ladder: checks the pipeline, not the figures")
    p.add_argument("--out", default=None, help="also write scaling.txt, .json, .md and .png here")
    p = sub.add_parser("bench-order", parents=[common],
                       help="does a method's TTFT depend on its position? same questions, methods in order and reversed")
    p.add_argument("--methods", default=None, help="default: the Ask tab's default methods")
    p.add_argument("--n", type=int, default=5, help="questions (SQuAD v1.1 dev sample)")
    p.add_argument("--out", default=None, help="also write order.json and order_summary.md here")
    p.add_argument("--articles", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("bench-storage", parents=[common],
                       help="every byte BTR and LLoCO keep, on the 2-article SQuAD sample and a larger essay collection")
    p.add_argument("--methods", default=None, help="method variants, default btr@bits=1,lloco@c=4")
    p.add_argument("--min-tokens", type=int, default=50_000, help="size of the essay collection")
    p.add_argument("--out", default="assets/results/storage")
    p = sub.add_parser("bench-prepare", parents=[common],
                       help="upload-to-ready tokens/s per method and for all together, against one plain prefill")
    p.add_argument("--path", default=None, help="a SQuAD v1.1 .json(.gz) (default: the bundled sample)")
    p.add_argument("--articles", type=int, default=3, help="whole articles in the collection (by --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None, help="default: every method with offline artifacts")
    p.add_argument("--quick", action="store_true", help="one short article, for a smoke test")
    p.add_argument("--out", default=None, help="also write prepare.json and prepare_summary.md here")
    p = sub.add_parser("bench-retrievers", parents=[common],
                       help="binary against float retriever on SQuAD questions: recall@k, gold-paragraph hits, index bytes")
    p.add_argument("--articles", default="2,all", help="comma-separated article counts of the bundled sample ('all')")
    p.add_argument("--n", type=int, default=100, help="questions per collection")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--rescore", type=int, default=None, help="candidates = k x rescore (default: the collection's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="assets/results/retrievers")
    p = sub.add_parser("bench-frontier", parents=[common],
                       help="plot value kept against speed-up for one method's variants over bench runs")
    p.add_argument("runs", nargs="+", help="bench output folders or their results.json")
    p.add_argument("--method", default="btr")
    p.add_argument("--out", required=True, help="the .png to write")
    p = sub.add_parser("results", parents=[common],
                       help="run the results suite every screen quotes, then write docs/RESULTS.md and the README tables")
    p.add_argument("--out", default=None, help="default: assets/results/suite (the bundled suite, replaced whole)")
    p.add_argument("--quick", action="store_true", help="a few questions per section: checks the pipeline, not the figures")
    p.add_argument("--sections", default=None, help="comma-separated subset (squad, heldout, speed, scaling, storage, retrievers)")
    p = sub.add_parser("methods", parents=[common], help="the Methods tab: each method's card and measured figures")
    p.add_argument("name", nargs="?", default=None, help="one method's whole card (default: one line per method)")
    from .bench.command import add_bench_parser

    add_bench_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        from .workbench import Workbench

        return COMMANDS[args.command](Workbench(_settings(args)), args)
    except UserError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(("\n" if sys.stderr.isatty() else "") + "error: interrupted", file=sys.stderr)  # not on the bar's line
        return 130
