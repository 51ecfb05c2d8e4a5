"""`python -m ragdemo ingest|ask|prepare|list|delete|bench-speed ...`: everything the UI can do."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .config import Settings
from .errors import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _settings(args) -> Settings:
    return Settings().with_(model_id=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                            max_new_tokens=args.max_new_tokens)


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, file=sys.stderr, leave=False, bar_format="{l_bar}{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * max(0.0, min(1.0, fraction))))
        bar.set_postfix_str(message[:60])
        bar.refresh()

    return bar, update


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
    bar, update = _progress_bar("ingest")
    with bar:
        reports = bench.ingest(files, args.collection, update)
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
    if args.json:
        # libraries sometimes print to stdout; with --json, stdout carries the JSON array and nothing else
        with contextlib.redirect_stdout(sys.stderr):
            results = bench.ask(args.question, methods, args.collection, knobs)
        print(json.dumps([r.to_dict() for r in results], indent=1))
        return 0
    results = bench.ask(args.question, methods, args.collection, knobs)
    for r in results:
        print(f"== {r.method} ({r.model})")
        print(r.error or r.answer)
        print(f"   prompt {r.prompt_tokens} tok, processed {r.processed_tokens}, cached {r.cached_tokens} | "
              f"retrieve {r.retrieve_s:.3f}s load {r.load_s:.3f}s ttft {r.ttft_s:.3f}s decode {r.decode_s:.3f}s "
              f"total {r.total_s:.3f}s ({r.decode_tok_s:.1f} tok/s) | storage {r.storage_bytes} B")
        for note in r.notes:
            print(f"   note: {note}")
    return 0


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


def cmd_list(bench, args) -> int:
    docs = bench.documents(args.collection)
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        print(f"collection {args.collection or bench.settings.default_collection!r} is empty")
    for d in docs:
        storage = ", ".join(f"{m} {b} B" for m, b in d["storage"].items()) or "no method artifacts"
        print(f"{d['id']:>5}  {d['name']}  {d['n_tokens']} tokens  {d['n_chunks']} chunks  {d['size']} bytes  [{storage}]")
    return 0


def cmd_delete(bench, args) -> int:
    doc = bench.delete(args.doc, args.collection)
    print(f"deleted {doc['name']} (id {doc['id']})")
    return 0


def cmd_bench_speed(bench, args) -> int:
    from .bench.speed import run_speed_bench

    run_speed_bench(bench, args.quick)
    return 0


def cmd_bench(bench, args) -> int:
    from .bench.command import cmd_bench as run

    return run(bench, args, parse_knobs, _progress_bar)


COMMANDS = {"ingest": cmd_ingest, "ask": cmd_ask, "prepare": cmd_prepare, "list": cmd_list, "delete": cmd_delete,
            "bench": cmd_bench,
            "finetune": cmd_finetune,
            "bench-speed": cmd_bench_speed}


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
    p = sub.add_parser("ask", parents=[common], help="answer a question with several methods")
    p.add_argument("question")
    p.add_argument("--methods", default=None, help="comma-separated, e.g. closed_book,full_context,rag")
    p.add_argument("--json", action="store_true", help="print a JSON array of Result objects, nothing else")
    p = sub.add_parser("prepare", parents=[common], help="build the methods' offline artifacts")
    p.add_argument("--methods", default=None)
    p = sub.add_parser("finetune", parents=[common], help="train a method's per-collection adapter (e.g. lloco)")
    p.add_argument("--method", required=True)
    p = sub.add_parser("list", parents=[common], help="list the documents of a collection")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("delete", parents=[common], help="delete a document (id, name or sha256 prefix)")
    p.add_argument("doc")
    p = sub.add_parser("bench-speed", parents=[common], help="ingest, retrieval, load and prefill speed on this machine")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    from .bench.command import add_bench_parser

    add_bench_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns about GPU kernels on every CPU import
    try:
        args = build_parser().parse_args(argv)
        from .workbench import Workbench

        return COMMANDS[args.command](Workbench(_settings(args)), args)
    except UserError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
