"""`python -m ragdemo bench ...`: arguments and the command, kept here so cli.py only wires it in."""
from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

from ..errors import UserError
from .scratch import scratch_workbench


def add_bench_parser(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common], help="benchmark methods on QA data (squad, needle, JSONL)")
    p.add_argument("--dataset", default="squad", help="squad, needle, or a .jsonl file of {question, answers, context?, doc?}")
    p.add_argument("--path", default=None, help="squad: a SQuAD v1.1 .json(.gz) (default: the bundled sample); "
                                                  "needle: a folder of essays")
    p.add_argument("--n", type=int, default=None, help="number of questions (sampled by --seed; default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--articles", type=int, default=None, help="squad: use this many whole articles (by --seed)")
    p.add_argument("--lengths", default=None, help="needle: context lengths in tokens, e.g. 1024,2048,4096")
    p.add_argument("--depths", default=None, help="needle: depths in percent, e.g. 0,25,50,75,100")
    p.add_argument("--methods", default=None,
                   help="comma-separated; variants as METHOD@KNOB=VALUE, e.g. rag,btr@bits=1,btr@bits=8")
    p.add_argument("--reference", default="rag", help="reference for context value kept: rag (default) or full_context")
    p.add_argument("--limit", action="append", default=[], metavar="METHOD=N",
                   help="ask a slow method only the first N questions")
    p.add_argument("--keep", action="store_true", help="keep the benchmark's store (in OUT/store) instead of a temp dir")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                   help="start no new question after MIN minutes; the outputs then say the run is partial")
    p.add_argument("--out", required=True, help="output folder: results.json, summary.csv, summary.md, plots")


def _ints(text: str | None, what: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) if "." in x else int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} takes comma-separated numbers, got {text!r}") from None


def _limits(pairs: list[str]) -> dict[str, int]:
    limits = {}
    for pair in pairs:
        label, sep, value = pair.rpartition("=")
        if not sep or not value.isdigit():
            raise UserError(f"--limit takes METHOD=N, got {pair!r}")
        limits[label] = int(value)
    return limits


def run_benchmark(workbench, dataset: str, out: str | Path, methods=None, knobs: dict | None = None,
                  limits: dict | None = None, path: str | None = None, n: int | None = None, seed: int = 0,
                  articles: int | None = None, lengths=None, depths=None, reference: str = "rag",
                  max_new_tokens: int | None = None, progress=None, cleanup: bool = True, plots: bool = True,
                  extra_meta: dict | None = None, time_budget_min: float | None = None, overrides: dict | None = None):
    """Everything `bench` does, shared by the CLI and the UI: load the data, run, write the outputs.
    `overrides` {method: {knob: value}} win even over a variant's own knobs (a small test model's depth).
    Returns (run, written files)."""
    workbench.require_private("the benchmark")
    from .datasets import load_dataset
    from .report import write_outputs
    from .runner import DEFAULT_MAX_NEW_TOKENS, run_bench
    from .specs import apply_limits, check_specs_on_model, parse_method_specs

    specs = parse_method_specs(methods, knobs)
    for spec in specs:
        spec.knobs.update((overrides or {}).get(spec.name, {}))
    apply_limits(specs, limits)
    check_specs_on_model(specs, workbench.models.lm, max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    tokenizer = workbench.models.lm.tokenizer if dataset == "needle" else None
    data = load_dataset(dataset, tokenizer, path, n, seed, articles, lengths, depths)
    print(f"{data.description}; methods: {', '.join(s.label for s in specs)}", file=sys.stderr)
    run = run_bench(workbench, data, specs, reference, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, progress,
                    cleanup=cleanup, extra_meta={"seed": seed, **(extra_meta or {})},
                    time_budget_s=time_budget_min * 60 if time_budget_min else None)
    return run, write_outputs(run, out, plots=plots)


def cmd_bench(bench, args, parse_knobs, progress_bar) -> int:
    knobs = parse_knobs(args.set)
    out = Path(args.out)
    # a store of its own: the user's library is untouched and every run starts from fresh collections
    with scratch_workbench(bench.settings, "bench", out / "store" if args.keep else None) as scratch:
        bar, update = progress_bar("bench")
        with bar, contextlib.redirect_stdout(sys.stderr):
            run, written = run_benchmark(
                scratch, args.dataset, out, args.methods, knobs, _limits(args.limit), args.path, args.n, args.seed,
                args.articles, _ints(args.lengths, "--lengths"), _ints(args.depths, "--depths"), args.reference,
                args.max_new_tokens, update, cleanup=not args.keep, plots=not args.no_plots,
                extra_meta=_command_meta(), time_budget_min=args.time_budget)
    print((out / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _command_meta() -> dict:
    """The command line, when this process is `python -m ragdemo bench ...` (not a test calling main())."""
    argv = sys.argv[1:]
    return {"command": as_command(argv)} if argv[:1] == ["bench"] else {}


def as_command(argv: list[str]) -> str:
    return "python -m ragdemo " + " ".join(map(shlex.quote, argv))


def equivalent_command(dataset: str, methods: list[str], out: str, n: int | None = None, seed: int = 0,
                       lengths: list | None = None, depths: list | None = None, reference: str = "rag",
                       max_new_tokens: int | None = None) -> str:
    """The `python -m ragdemo bench` line that runs what the Benchmark tab was asked: a run started in the
    browser can be repeated, or scripted, from a terminal (the same runner does both)."""
    argv = ["bench", "--dataset", dataset]
    if dataset != "needle":  # needle's questions are its lengths x depths: n and seed do not apply
        argv += ["--n", str(n)] if n else []
        argv += ["--seed", str(seed)] if seed else []
    argv += ["--methods", ",".join(methods)]
    if dataset == "needle":
        argv += ["--lengths", _joined(lengths)] if lengths else []
        argv += ["--depths", _joined(depths)] if depths else []
    argv += ["--reference", reference] if reference and reference != "rag" else []
    argv += ["--max-new-tokens", str(max_new_tokens)] if max_new_tokens else []
    return as_command(argv + ["--out", out])


def _joined(numbers: list) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in numbers)
